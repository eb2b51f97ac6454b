"""Causal depthwise short convolution over time, with a cache of the last inputs for step-by-step decoding."""
import torch
from torch import nn

from gdn_exp.ops.short_conv.reference import causal_conv


def packed_sequence_ids(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """Index of the packed sequence each of the T tokens belongs to: LongTensor [T].

    cu_seqlens: LongTensor [N + 1] of boundaries (0 = cu_seqlens[0] < ... < cu_seqlens[N] = T).
    """
    tokens = torch.arange(T, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True)


def positions_in_sequence(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """How many tokens of its own packed sequence precede each of the T tokens: LongTensor [T]."""
    return torch.arange(T, device=cu_seqlens.device) - cu_seqlens[packed_sequence_ids(cu_seqlens, T)]


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
