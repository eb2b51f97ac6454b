"""The short convolution's PyTorch form: the reference of `kernel.py` and the path on CPU, with a conv cache
(generation) or without the convolution (the no_conv ablation)."""
import torch
import torch.nn.functional as F


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


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / |x| over the last dim, computed in at least float32 (float64 stays float64) and returned in x's dtype
    (under autocast F.normalize returns float32, which would send the op down its much slower float32 path)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1).to(x.dtype)


def short_conv_silu(x, weight, parts, *, position=None, cache=None, use_cache=False):
    """`gdn_exp.ops.short_conv_silu` in PyTorch: the same arguments (without backend) and returns."""
    B, T, _ = x.shape
    padded = None
    if weight is not None:
        x, padded = causal_conv(x, weight, cache, position)
    outs = []
    for part, (heads, dim, normalise) in zip(F.silu(x).split([h * d for h, d, _ in parts], dim=-1), parts):
        part = part.reshape(B, T, heads, dim)                                 # a view: the ops copy what they need
        outs.append(l2_normalize(part) if normalise else part)
    return tuple(outs), (padded[:, T:] if use_cache and padded is not None else None)
