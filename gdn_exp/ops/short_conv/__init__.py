"""The Gated DeltaNet layer's path from its qkv projection to the op's inputs:

    y = causal depthwise conv of x (width W),   s = silu(y),   out = s / |s| per head (parts that are normalised)

    kernel.py      the fused Triton form, forward and backward
    reference.py   the PyTorch form (its reference; the path on CPU, with a conv cache, or without the conv)
"""
from gdn_exp.ops.backend import resolve_backend

from . import reference


def short_conv_silu(x, weight, parts, *, position=None, cache=None, use_cache=False, backend="auto"):
    """Causal depthwise conv, SiLU, split into parts, per-head L2 norm where asked; differentiable in x and weight.

    Args:
        x: [B, T, C]; weight: [C, W], or None for no convolution (SiLU and norms only).
        parts: ((heads, head_dim, normalise), ...) splitting C in order (sum of heads * head_dim = C).
        position: LongTensor [T], tokens of its own packed sequence before each token (B = 1), or None.
        cache: [B, W-1, C], the inputs before x (generation), or None for zeros; use_cache: also return the
            cache after x.
        backend: "auto", "triton" or "torch". Triton runs the whole chain as one kernel each way, where there is
            a convolution and no cache.
    Returns:
        (one [B, T, heads, head_dim] tensor per part, in x's dtype; the cache after x [B, W-1, C] or None).
    """
    if sum(heads * dim for heads, dim, _ in parts) != x.shape[-1]:
        raise ValueError(f"parts {parts} do not add up to the {x.shape[-1]} channels of x")
    if weight is not None and cache is None and not use_cache and resolve_backend(backend, x.device) == "triton":
        from .kernel import triton_short_conv_silu  # imports Triton, which is Linux-only

        return triton_short_conv_silu(x, weight, parts, position), None
    return reference.short_conv_silu(x, weight, parts, position=position, cache=cache, use_cache=use_cache)
