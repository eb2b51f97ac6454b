"""Chunkwise scalar-decay linear attention in Triton (the no_delta ablation): S <- exp(g_t) S + k_t (beta_t v_t)^T,
one decay g_t per head (FLA's simple GLA; GLA proper gates each key channel).

Without the delta rule a chunk's update needs no triangular solve: U = beta V directly, and the rest is the gated
delta rule's chunk algorithm (`chunk.py`) with W = 0. So this file adds only what differs, per chunk and head:

    G = cumsum(g), U = beta V                                    (chunk_gla_fwd_kernel)
    state pass and output: chunk.py's kernels with DELTA=False   (no W S term, no W^T dU term, no dW)
    dv = beta dU, dbeta = sum(V * dU), dg = reverse cumsum of dG (chunk_gla_bwd_kernel)

U is stored in k's dtype as the delta rule's U~ is. A training forward keeps the inputs, G, the chunk-start
states h and U (`chunk.ChunkFunction`); backward runs the reverse state pass and the per-chunk gradients.
"""
import torch
import triton
import triton.language as tl

from .chunk import (CHUNK_SIZE, chunk_dqk_bwd, chunk_state_bwd, chunk_state_output_fwd, run_chunk,
                    store_gate_grads, summed_parts, wy_gates)
from .launch import DEFAULT_LAUNCH
from .triton_utils import block_size, chunk_position, load_tokens, store_tokens


@triton.jit
def chunk_gla_fwd_kernel(v, g, beta, g_cum, u, cu_seqlens, chunk_indices, H: tl.constexpr, V: tl.constexpr,
                         BT: tl.constexpr, BV: tl.constexpr):
    """Per chunk: G = cumsum(g) into g_cum, U = beta V into u."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    _, b_beta, _ = wy_gates(g, beta, g_cum, bos, i_h, seq_len, i_c * BT, 0.0, H, BT)
    for i_v in range(tl.cdiv(V, BV)):
        b_v = load_tokens(v, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        store_tokens(u, b_v * b_beta[:, None], bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)


@triton.jit(do_not_specialize=["T_total"])
def chunk_gla_bwd_kernel(v, beta, du, dG_part, dv, dbeta, dg, cu_seqlens, chunk_indices, T_total,
                         H: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                         NK_PARTS: tl.constexpr):
    """Per chunk: through U = beta V, dv = beta dU and dbeta = sum(V * dU) per row; dg from the summed dG
    parts."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    o_i = tl.arange(0, BT)
    m_t = i_c * BT + o_i < seq_len
    o_gate = (bos + i_c * BT + o_i) * H + i_h
    b_beta = tl.load(beta + o_gate, mask=m_t, other=0).to(tl.float32)
    b_dG = summed_parts(dG_part, o_gate, m_t, T_total, H, BT, NK_PARTS)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        b_v = load_tokens(v, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        b_du = load_tokens(du, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        b_dbeta += tl.sum(b_v * b_du, 1)
        store_tokens(dv, b_du * b_beta[:, None], bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
    store_gate_grads(dg, dbeta, b_dG, b_dbeta, o_gate, m_t, BT)


def chunk_gla_fwd(v, g, beta, layout, k_dtype, settings=DEFAULT_LAUNCH):
    """Returns G [B, T, H] (float32 cumsum of g within chunks) and U = beta V [B, T, H, V] in k_dtype."""
    B, T, H, V = v.shape
    g_cum = torch.empty(B, T, H, device=v.device, dtype=torch.float32)
    u = torch.empty(B, T, H, V, device=v.device, dtype=k_dtype)
    chunk_gla_fwd_kernel[(layout.num_chunks, H)](v, g, beta, g_cum, u, layout.cu_seqlens, layout.chunk_indices,
                                                 H=H, V=V, BT=CHUNK_SIZE, BV=block_size(V, 64),
                                                 **settings.launch("gla", v.dtype))
    return g_cum, u


def chunk_gla_bwd(v, g, beta, du, dG_part, layout, settings=DEFAULT_LAUNCH):
    """Returns dv, dg, dbeta in the dtypes of v, g, beta."""
    B, T, H, V = v.shape
    dv, dg, dbeta = torch.empty_like(v), torch.empty_like(g), torch.empty_like(beta)
    chunk_gla_bwd_kernel[(layout.num_chunks, H)](v, beta, du, dG_part, dv, dbeta, dg, layout.cu_seqlens,
                                                 layout.chunk_indices, B * T, H=H, V=V, BT=CHUNK_SIZE,
                                                 BV=block_size(V, 64), NK_PARTS=dG_part.shape[0],
                                                 **settings.launch("gla", v.dtype))
    return dv, dg, dbeta


def chunk_gla_fwd_all(q, k, v, g, beta, scale, initial_state, output_final_state, layout, for_backward,
                      settings=DEFAULT_LAUNCH):
    """Returns o, the final state (or None) and, with for_backward, what backward keeps: G, the chunk-start
    states h and U (else None, None, None)."""
    g_cum, u = chunk_gla_fwd(v, g, beta, layout, k.dtype, settings)
    o, final_state, h, u = chunk_state_output_fwd(q, k, v, None, u, None, beta, g_cum, scale, initial_state,
                                                  output_final_state, layout, v.dtype, keep_states=for_backward,
                                                  settings=settings)
    return o, final_state, g_cum if for_backward else None, h, u


def chunk_gla_bwd_all(q, k, v, g, beta, g_cum, h, u, scale, has_initial_state, do, dht, layout,
                      settings=DEFAULT_LAUNCH):
    dh, du, dh0 = chunk_state_bwd(q, k, None, g_cum, do, dht, scale, has_initial_state, layout, settings)
    dq, dk, _, dG_part = chunk_dqk_bwd(q, k, u, g_cum, h, do, dh, du, scale, layout, settings, delta=False)
    del dh
    dv, dg, dbeta = chunk_gla_bwd(v, g, beta, du, dG_part, layout, settings)
    return dq, dk, dv, dg, dbeta, dh0


def triton_chunk_gated_linear_attention(q, k, v, g, beta, *, scale, initial_state=None, output_final_state=False,
                                        cu_seqlens=None, settings=DEFAULT_LAUNCH):
    """Chunkwise scalar-decay linear attention (chunk size 64) in Triton, differentiable in every input; the arguments
    and returns of `chunk.triton_chunk_gated_delta_rule`."""
    return run_chunk(chunk_gla_fwd_all, chunk_gla_bwd_all, q, k, v, g, beta, scale, initial_state, output_final_state,
                     cu_seqlens, settings)
