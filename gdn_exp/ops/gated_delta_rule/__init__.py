"""The gated delta rule: one entry point that dispatches to the Triton kernels or the PyTorch forms.

    o, final_state = gated_delta_rule(q, k, v, g, beta, mode="chunk", backend="auto")

    chunk.py        chunkwise Triton kernels (UT/WY form), forward and backward, and their launch settings
    chunk_gla.py    the chunk kernels without the delta rule (the no_delta ablation: linear attention with one
                    decay per head, FLA's "simple GLA", not GLA's per-channel gate)
    recurrent.py    step-by-step Triton kernels, and the in-place decode step
    reference.py    the PyTorch forms: the token-by-token oracle (float64-capable) and the chunkwise form
    triton_utils.py the sequence layout and dot helpers both kernel files share
    check.py        the kernels' correctness matrix against the float64 oracle (`gdn-bench check`)

backend "auto" runs Triton for CUDA tensors and PyTorch otherwise; "triton" also runs on CPU tensors under
TRITON_INTERPRET=1 (float32 only), which is how CI tests the kernels without a GPU.
"""
from gdn_exp.ops.backend import resolve_backend

from . import reference

MODES = ("chunk", "recurrent")


def _check(q, k, v, g, beta, initial_state, cu_seqlens, mode, channel_decay=False):
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with B, T, H of q {tuple(q.shape)}; got {tuple(v.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = {(B, T, H)}; got {tuple(beta.shape)}")
    if g.shape != (B, T, H) and not (channel_decay and g.shape == q.shape):
        shapes = f"[B, T, H] = {(B, T, H)}" + (f" or [B, T, H, K] = {tuple(q.shape)}" if channel_decay else "")
        raise ValueError(f"g must be {shapes}; got {tuple(g.shape)}")
    N = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B = 1 (packed sequences); got B = {B}")
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {T}")
        N = len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (N, H, q.shape[-1], v.shape[-1]):
        raise ValueError(f"initial_state must be [N, H, K, V] = {(N, H, q.shape[-1], v.shape[-1])}; "
                         f"got {tuple(initial_state.shape)}")


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, mode="chunk", backend="auto"):
    """Gated delta rule over a sequence, per head:

        S <- exp(g_t) S;  u_t = beta_t (v_t - S^T k_t);  S <- S + k_t u_t^T;  o_t = S^T (scale q_t)

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay, <= 0) and beta: [B, T, H].
        scale: multiplies q, default K ** -0.5. No normalisation happens inside the op.
        initial_state: [N, H, K, V] float32 (N = B, or len(cu_seqlens) - 1 with B = 1), or None for zeros.
        output_final_state: also return the state after the last token.
        cu_seqlens: LongTensor [N + 1], boundaries of packed sequences in a B = 1 batch, or None.
        mode: "chunk" (chunkwise parallel) or "recurrent" (step by step); both are differentiable.
        backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "triton" or "torch".
    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [N, H, K, V] float32 (float64 for float64 inputs), or None.

    Example:
        >>> B, T, H, K, V = 2, 100, 4, 32, 32
        >>> q, k = torch.randn(B, T, H, K), torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
        >>> v, g, beta = torch.randn(B, T, H, V), -torch.rand(B, T, H), torch.rand(B, T, H)
        >>> o, S = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([2, 100, 4, 32]), torch.Size([2, 4, 32, 32]))
    """
    _check(q, k, v, g, beta, initial_state, cu_seqlens, mode)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if resolve_backend(backend, q.device) == "triton":
        if mode == "chunk":
            _check_chunk_head_dim(q)
            from .chunk import triton_chunk_gated_delta_rule as fn  # imports Triton, which is Linux-only
        else:
            from .recurrent import triton_recurrent_gated_delta_rule as fn
    else:
        fn = reference.chunk_gated_delta_rule if mode == "chunk" else reference.recurrent_gated_delta_rule
    return fn(q, k, v, g, beta, **kwargs)


def _check_chunk_head_dim(q):
    if q.shape[-1] > 256:  # the state passes hold all of K in one block
        raise ValueError(f"the Triton chunk kernels take head dims K <= 256, got K={q.shape[-1]}; use "
                         f"mode='recurrent' or backend='torch'")


# Without the delta rule a chunk needs no triangular solve, so a whole sequence can be one chunk (no sequential
# loop: most of a small step's launches) while its [B, H, T, T] matrices stay within this many elements
GLA_ONE_CHUNK_ELEMENTS = 2**25


def gated_linear_attention(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, mode="chunk", backend="auto"):
    """The no-delta ablation, S <- exp(g_t) S + k_t (beta_t v_t)^T: linear attention with a scalar decay per head
    and step (Mamba2-like; FLA's simple_gla), or with g [B, T, H, K] one per key channel (GLA's gate).

    Same arguments and returns as `gated_delta_rule`, g also [B, T, H, K]. With a scalar decay the chunk form
    runs in Triton (`chunk_gla.py`) where the backend resolves to it; the recurrent form is always PyTorch's token
    loop, and a decay per channel runs in PyTorch only (`reference.chunk_channel_gated_linear_attention`).
    """
    _check(q, k, v, g, beta, initial_state, cu_seqlens, mode, channel_decay=True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if g.dim() == 4 and mode == "chunk":
        return reference.chunk_channel_gated_linear_attention(q, k, v, g, beta, **kwargs)
    if g.dim() == 4:
        return reference.recurrent_gated_delta_rule(q, k, v, g, beta, use_delta=False, **kwargs)
    if mode == "chunk" and resolve_backend(backend, q.device) == "triton":
        _check_chunk_head_dim(q)
        from .chunk_gla import triton_chunk_gated_linear_attention

        return triton_chunk_gated_linear_attention(q, k, v, g, beta, **kwargs)
    if mode == "recurrent":
        return reference.recurrent_gated_delta_rule(q, k, v, g, beta, use_delta=False, **kwargs)
    B, T, H = q.shape[:3]
    chunk_size = T if B * H * T * T <= GLA_ONE_CHUNK_ELEMENTS else 64
    return reference.chunk_gated_delta_rule(q, k, v, g, beta, use_delta=False, chunk_size=chunk_size, **kwargs)


def decode_step(q, k, v, g, beta, state, *, scale):
    """One generation step (q, k, v, g, beta of one token per sequence) that updates `state` [B, H, K, V] in
    place and returns o [B, 1, H, V]: `recurrent.triton_decode_step`. Triton only (no autograd)."""
    from .recurrent import triton_decode_step  # imports Triton, which is Linux-only

    return triton_decode_step(q, k, v, g, beta, state, scale=scale)
