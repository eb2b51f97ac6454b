"""SwiGLU feed-forward block."""
import math

from torch import nn

from gdn_exp.ops import swiglu


def swiglu_hidden_size(d_model: int, mlp_ratio: float, multiple_of: int = 16) -> int:
    """Hidden width of a SwiGLU with the parameters of a plain MLP of width mlp_ratio * d_model.

    A SwiGLU has three d_model x hidden matrices instead of two, so hidden = 2/3 * mlp_ratio * d_model,
    rounded up to a multiple of `multiple_of` (d_model=128, mlp_ratio=4 -> 352).
    """
    return multiple_of * math.ceil(mlp_ratio * d_model * 2 / 3 / multiple_of)


class SwiGLU(nn.Module):
    """y = down_proj(silu(gate_proj(x)) * up_proj(x)); x, y: [B, T, d_model]. 3 * d_model * hidden_size params.

    backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "triton" or "torch" (`ops.swiglu`).
    """

    def __init__(self, d_model: int, hidden_size: int, backend: str = "auto"):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden_size, bias=False)
        self.up_proj = nn.Linear(d_model, hidden_size, bias=False)
        self.down_proj = nn.Linear(hidden_size, d_model, bias=False)
        self.backend = backend

    def forward(self, x):
        a, b = self.gate_proj(x), self.up_proj(x)                               # [B, T, hidden_size]
        return self.down_proj(swiglu(a, b, backend=self.backend))
