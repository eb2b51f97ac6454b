"""Causal softmax attention with rotary position embeddings (or none: the model adds learned ones), an optional
sliding window and a KV cache."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .conv import packed_sequence_ids


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (RoPE, rotate-half layout) of x [B, T, H, D] at positions LongTensor [T].

    Channel pairs (i, i + D/2) rotate by the angle position * theta^(-2i/D). Angles are computed in float64
    so that long positions keep their precision; the rotation runs in x's dtype (at least float32).
    """
    half = x.shape[-1] // 2
    frequencies = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)   # [D/2]
    angles = positions.to(torch.float64)[:, None] * frequencies                                 # [T, D/2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]                 # [T, 1, D/2]
    x1, x2 = x.to(dtype).split(half, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def attention_mask(query_positions, key_positions, window=None, sequence_ids=None):
    """Which keys each query may see: BoolTensor [Tq, Tk], True = attend.

    A query at position p sees keys at positions p - window < s <= p (all s <= p without a window) and,
    for packed sequences, only keys of its own sequence (sequence_ids [T], queries and keys alike).
    """
    offset = query_positions[:, None] - key_positions[None, :]                 # [Tq, Tk]
    allowed = offset >= 0
    if window is not None:
        allowed &= offset < window
    if sequence_ids is not None:
        allowed &= sequence_ids[:, None] == sequence_ids[None, :]
    return allowed


class Attention(nn.Module):
    """Multi-head causal self-attention: x [B, T, d_model] -> y [B, T, d_model].

    head_dim = d_model / num_heads (must be even for RoPE). Parameters: 4 d_model^2 (fused qkv_proj, o_proj),
    plus 4 d_model with bias=True (Zoology's attention has biases). window: each token sees itself and the
    window - 1 tokens before it (None = all of them); the KV cache then keeps only those window - 1 keys.
    rope_theta: RoPE's base, or None for no rotation (positions then come with x, e.g. learned ones added to the
    token embedding). Softmax attention is torch's scaled_dot_product_attention.
    """

    def __init__(self, d_model: int, num_heads: int, *, window=None, rope_theta: Optional[float] = 10000.0,
                 bias: bool = False):
        super().__init__()
        if num_heads < 1 or d_model % num_heads != 0:
            raise ValueError(f"Attention: d_model={d_model} is not divisible by num_heads={num_heads}")
        if rope_theta is not None and (d_model // num_heads) % 2 != 0:
            raise ValueError(f"Attention: head_dim = d_model / num_heads = {d_model // num_heads} "
                             f"must be even for RoPE")
        if window is not None and window < 1:
            raise ValueError(f"Attention: window={window} must be >= 1 or None")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.window, self.rope_theta = window, rope_theta
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.record = None  # for analysis, gdn_exp.analyze: called with the rotated q, k and v

    def forward(self, x, *, cu_seqlens=None, cache=None, use_cache=False):
        """
        Args:
            x: [B, T, d_model].
            cu_seqlens: LongTensor [N + 1] of packed-sequence boundaries (B = 1); no token sees another sequence.
            cache: {"k": [B, H, L, D], "v": [B, H, L, D], "position": int (tokens seen so far)}, keys and
                values already rotated, or None to start at position 0.
            use_cache: also return the cache after x, in the same form.
        Returns:
            y: [B, T, d_model]; the new cache or None.
        """
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("Attention: cu_seqlens cannot be combined with a cache")
        B, T, d_model = x.shape
        H, D = self.num_heads, self.head_dim
        start = 0 if cache is None else cache["position"]
        positions = torch.arange(start, start + T, device=x.device)
        q, k, v = self.qkv_proj(x).view(B, T, 3, H, D).unbind(dim=2)          # [B, T, H, D] each
        if self.rope_theta is not None:
            q, k = apply_rotary(q, positions, self.rope_theta), apply_rotary(k, positions, self.rope_theta)
        if self.record is not None:  # for analysis, gdn_exp.analyze (causal; each query sees `window` keys)
            self.record({"q": q, "k": k, "v": v, "window": self.window, "scale": D ** -0.5})
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # [B, H, T, D]
        if cache is not None:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)   # [B, H, L + T, D]

        if cache is None and cu_seqlens is None and self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)        # lets torch pick flash attention
        else:
            key_positions = torch.arange(start + T - k.shape[2], start + T, device=x.device)
            sequence_ids = None if cu_seqlens is None else packed_sequence_ids(cu_seqlens, T)
            mask = attention_mask(positions, key_positions, self.window, sequence_ids)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, d_model))

        if not use_cache:
            return y, None
        if self.window is not None:  # later queries never see keys more than window - 1 tokens back
            first = max(0, k.shape[2] - (self.window - 1))
            k, v = k[:, :, first:], v[:, :, first:]
        return y, {"k": k, "v": v, "position": start + T}
