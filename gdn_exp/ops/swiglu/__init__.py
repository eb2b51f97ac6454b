"""SwiGLU's gating, h = silu(a) * b:

    kernel.py      one Triton kernel each way (float32 math)
    reference.py   the PyTorch form (its reference; the path on CPU)
"""
from gdn_exp.ops.backend import resolve_backend

from . import reference


def swiglu(a, b, *, backend="auto"):
    """h = silu(a) * b; differentiable in a and b.

    Args:
        a, b: equal shapes and dtype (in the MLP: gate_proj(x) and up_proj(x), [B, T, hidden]).
        backend: "auto", "triton" or "torch".
    Returns:
        h: a's shape and dtype.
    """
    if resolve_backend(backend, a.device) == "triton":
        from .kernel import triton_swiglu  # imports Triton, which is Linux-only

        return triton_swiglu(a, b)
    return reference.swiglu(a, b)
