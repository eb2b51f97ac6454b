"""Causal depthwise short convolution over time, with a cache of the last inputs for step-by-step decoding."""
import torch
from torch import nn


def packed_sequence_ids(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """Index of the packed sequence each of the T tokens belongs to: LongTensor [T].

    cu_seqlens: LongTensor [N + 1] of boundaries (0 = cu_seqlens[0] < ... < cu_seqlens[N] = T).
    """
    tokens = torch.arange(T, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)


def positions_in_sequence(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """How many tokens of its own packed sequence precede each of the T tokens: LongTensor [T]."""
    return torch.arange(T, device=cu_seqlens.device) - cu_seqlens[packed_sequence_ids(cu_seqlens, T)]


def causal_conv(x, weight, past=None, position=None):
    """Causal depthwise convolution y_t = sum_{i < W} weight[:, W-1-i] * x_{t-i}, computed in x's dtype.

    Args:
        x: [B, T, D]; weight: [D, W] (cast to x's dtype: under autocast x is bf16, and a float32 y would
            send everything after it down float32 paths).
        past: [B, W-1, D], the inputs before x (oldest first), or None for zeros.
        position: LongTensor [T], tokens of its own sequence before each token (packed sequences): a tap
            further back reads zero. None: one sequence per row.
    Returns:
        y: [B, T, D]; padded: [B, W-1+T, D], past and x (its last W-1 rows continue the sequence).
    """
    B, T, D = x.shape
    W = weight.shape[1]
    padded = torch.cat([x.new_zeros(B, W - 1, D) if past is None else past, x], dim=1)
    weight = weight.to(x.dtype)
    y = torch.zeros_like(x)
    for i in range(W):  # tap i reads the input i steps back
        tap = padded[:, W - 1 - i : W - 1 - i + T]                             # [B, T, D]
        if position is not None:
            tap = tap * (position >= i)[:, None].to(x.dtype)
        y = y + tap * weight[:, W - 1 - i]
    return y, padded


class ShortConvolution(nn.Module):
    """Causal depthwise convolution of width W: y_t = sum_{i < W} weight[:, W-1-i] * x_{t-i}, per channel.

    Tokens before the start of a sequence count as zeros, or as the cached inputs when a cache is given.
    No bias and no activation (the caller applies one). Parameters: weight [D, W], D * W in total,
    initialised like torch's Conv1d (uniform in +-1/sqrt(W)).
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"conv kernel_size={kernel_size} must be >= 1")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        bound = kernel_size ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, kernel_size={self.kernel_size}"

    def forward(self, x, *, cu_seqlens=None, cache=None, use_cache=False):
        """
        Args:
            x: [B, T, D].
            cu_seqlens: LongTensor [N + 1] of packed-sequence boundaries (B = 1); no tap crosses a boundary.
            cache: [B, W-1, D], the W-1 inputs that preceded x (oldest first), or None for zeros.
            use_cache: also return the cache to continue after x.
        Returns:
            y: [B, T, D]; cache: [B, W-1, D] (the last W-1 inputs, zeros where there were none), or None.
        """
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("ShortConvolution: cu_seqlens cannot be combined with a cache")
        position = None if cu_seqlens is None else positions_in_sequence(cu_seqlens, x.shape[1])
        y, padded = causal_conv(x, self.weight, cache, position)
        return y, (padded[:, x.shape[1]:] if use_cache else None)
