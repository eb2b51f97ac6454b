"""Step-by-step gated delta rule in Triton: a fused recurrent kernel, its backward, and an in-place decode step.

One program owns the float32 state columns [i_v BV, i_v BV + BV) of one head of one sequence and walks the
tokens in order (`recurrent_fwd_kernel`):

    S_a = exp(g_t) S;  e_t = v_t - S_a^T k_t;  S = S_a + beta_t k_t e_t^T;  o_t = S^T (scale q_t)

Backward walks the tokens in reverse with dS in registers and needs every past state. The forward stores a
checkpoint of the state every C tokens (C ~ sqrt(T), a power of two in [16, 256]); the backward reloads a
checkpoint, recomputes the C states of that segment into a per-(sequence, head) scratch buffer, then steps
back through the segment. Memory: O((T/C + C) K V) per head instead of O(T K V). The V split makes dq, dk,
dg and dbeta partial sums over V blocks, reduced in PyTorch.

`triton_decode_step` runs the forward kernel for T = 1 with the state read and written in place, with the V
block and warps of `DECODE_LAUNCH` (`gdn-bench op --sweep` times the alternatives).
"""
import math

import torch
import triton
import triton.language as tl

from .triton_utils import load_state, sequence_bounds, sequence_layout, start_state, store_state

# triton_decode_step's launch: V block (a power of two; None = forward_block_v's choice for a decode step) and
# num_warps. H100, B64 H16 D128, CUDA graph, 2026-11-27: BV 64 / 4 warps 49.7 us, BV 32 50.6,
# 16 52.6-54, 128 54-417 (`gdn-bench decode --sweep`).
DECODE_LAUNCH = dict(BV=None, num_warps=4)


@triton.jit
def token_vector_offsets(bos, t, i_h, H: tl.constexpr, D: tl.constexpr, col, BD: tl.constexpr):
    """Offsets and mask of columns [col, col + BD) of token bos + t, head i_h, in a [tokens, H, D] tensor."""
    o_d = col + tl.arange(0, BD)
    return ((bos + t) * H + i_h) * D + o_d, o_d < D


@triton.jit
def load_token_vector(base, bos, t, i_h, H: tl.constexpr, D: tl.constexpr, col, BD: tl.constexpr):
    o_x, m_x = token_vector_offsets(bos, t, i_h, H, D, col, BD)
    return tl.load(base + o_x, mask=m_x, other=0).to(tl.float32)


@triton.jit
def store_token_vector(base, b_x, bos, t, i_h, H: tl.constexpr, D: tl.constexpr, col, BD: tl.constexpr):
    o_x, m_x = token_vector_offsets(bos, t, i_h, H, D, col, BD)
    tl.store(base + o_x, b_x.to(base.dtype.element_ty), mask=m_x)


@triton.jit
def sequence_of_program(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """Start token (int64) and length of sequence i_n: from cu_seqlens, or i_n * T and T for a [B, T] batch."""
    if IS_VARLEN:
        bos, seq_len = sequence_bounds(cu_seqlens, i_n)
    else:
        bos, seq_len = i_n.to(tl.int64) * T, T
    return bos, seq_len


@triton.jit
def delta_step(b_S, b_k, b_v, b_g, b_beta):
    """One token: returns the decayed state S_a, the error e = v - S_a^T k and the new state."""
    b_Sa = b_S * tl.exp(b_g)
    b_e = b_v - tl.sum(b_Sa * b_k[:, None], 0)
    return b_Sa, b_e, b_Sa + b_k[:, None] * (b_beta * b_e)[None, :]


@triton.jit
def load_token(q, k, v, g, beta, bos, t, i_h, i_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr):
    """q_t, k_t [BK], v_t [BV] (columns of block i_v), g_t, beta_t of one head, all float32."""
    b_q = load_token_vector(q, bos, t, i_h, H, K, 0, BK)
    b_k = load_token_vector(k, bos, t, i_h, H, K, 0, BK)
    b_v = load_token_vector(v, bos, t, i_h, H, V, i_v * BV, BV)
    b_g = tl.load(g + (bos + t) * H + i_h).to(tl.float32)
    b_beta = tl.load(beta + (bos + t) * H + i_h).to(tl.float32)
    return b_q, b_k, b_v, b_g, b_beta


@triton.jit(do_not_specialize=["T", "C"])
def recurrent_fwd_kernel(q, k, v, g, beta, o, h0, ht, checkpoints, scale, T, C, cu_seqlens, checkpoint_offsets,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         IS_VARLEN: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                         STORE_FINAL_STATE: tl.constexpr, SAVE_CHECKPOINTS: tl.constexpr):
    """One sequence and head, V columns of block i_v: o_t for every token; the state before every C-th
    token into checkpoints (if SAVE_CHECKPOINTS). h0 and ht may be the same tensor (in-place update)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = sequence_of_program(cu_seqlens, i_n, T, IS_VARLEN)
    b_S = start_state(h0, i_n, i_h, H, K, V, i_v * BV, BK, BV, USE_INITIAL_STATE)
    if SAVE_CHECKPOINTS:
        if IS_VARLEN:
            i_s0 = tl.load(checkpoint_offsets + i_n)
        else:
            i_s0 = i_n * tl.cdiv(T, C)
    for t in range(seq_len):
        if SAVE_CHECKPOINTS:
            if t % C == 0:
                store_state(checkpoints, b_S, i_s0 + t // C, i_h, H, K, V, 0, i_v * BV, BK, BV)
        b_q, b_k, b_v, b_g, b_beta = load_token(q, k, v, g, beta, bos, t, i_h, i_v, H, K, V, BK, BV)
        _, _, b_S = delta_step(b_S, b_k, b_v, b_g, b_beta)
        store_token_vector(o, tl.sum(b_S * (scale * b_q)[:, None], 0), bos, t, i_h, H, V, i_v * BV, BV)
    if STORE_FINAL_STATE:
        store_state(ht, b_S, i_n, i_h, H, K, V, 0, i_v * BV, BK, BV)


@triton.jit(do_not_specialize=["T", "C", "T_total"])
def recurrent_bwd_kernel(q, k, v, g, beta, checkpoints, scratch, do, dht, dq_part, dk_part, dv, dg_part,
                         dbeta_part, dh0, scale, T, C, T_total, cu_seqlens, checkpoint_offsets,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         IS_VARLEN: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                         USE_FINAL_STATE_GRADIENT: tl.constexpr):
    """Reverse pass for one sequence and head, V columns of block i_v. Per token, with dS the gradient of
    the state after it and u = beta e:

        dS += scale q do^T;  du = dS^T k;  dv = beta du;  dbeta = du.e;  dq = scale S do;
        dk = dS u - S_a (beta du);  dS_a = dS - k (beta du)^T;  dg = sum(dS_a * S_a);  dS <- exp(g) dS_a

    dq, dk, dg, dbeta are partial sums over this V block (summed by the launcher)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = sequence_of_program(cu_seqlens, i_n, T, IS_VARLEN)
    if IS_VARLEN:
        i_s0 = tl.load(checkpoint_offsets + i_n)
    else:
        i_s0 = i_n * tl.cdiv(T, C)
    o_gate = i_v * T_total * H + bos * H + i_h       # into [NV, tokens, H]
    b_dS = start_state(dht, i_n, i_h, H, K, V, i_v * BV, BK, BV, USE_FINAL_STATE_GRADIENT)
    num_segments = tl.cdiv(seq_len, C)
    for i_r in range(num_segments):
        i_s = num_segments - 1 - i_r
        t0 = i_s * C
        t1 = tl.minimum(seq_len, t0 + C)
        # recompute the states before each token of the segment from its checkpoint
        b_S = load_state(checkpoints, i_s0 + i_s, i_h, H, K, V, 0, i_v * BV, BK, BV)
        for t in range(t0, t1):
            store_state(scratch, b_S, i_n * C + t - t0, i_h, H, K, V, 0, i_v * BV, BK, BV)
            _, b_k, b_v, b_g, b_beta = load_token(q, k, v, g, beta, bos, t, i_h, i_v, H, K, V, BK, BV)
            _, _, b_S = delta_step(b_S, b_k, b_v, b_g, b_beta)
        tl.debug_barrier()
        for t_r in range(t1 - t0):
            t = t1 - 1 - t_r
            b_S = load_state(scratch, i_n * C + t - t0, i_h, H, K, V, 0, i_v * BV, BK, BV)
            b_q, b_k, b_v, b_g, b_beta = load_token(q, k, v, g, beta, bos, t, i_h, i_v, H, K, V, BK, BV)
            b_Sa, b_e, b_S = delta_step(b_S, b_k, b_v, b_g, b_beta)
            b_do = load_token_vector(do, bos, t, i_h, H, V, i_v * BV, BV)
            b_dS += (scale * b_q)[:, None] * b_do[None, :]
            b_du = tl.sum(b_dS * b_k[:, None], 0)
            b_dSa = b_dS - b_k[:, None] * (b_beta * b_du)[None, :]
            b_dq = scale * tl.sum(b_S * b_do[None, :], 1)
            b_dk = tl.sum(b_dS * (b_beta * b_e)[None, :], 1) - tl.sum(b_Sa * (b_beta * b_du)[None, :], 1)
            store_token_vector(dq_part + i_v * T_total * H * K, b_dq, bos, t, i_h, H, K, 0, BK)
            store_token_vector(dk_part + i_v * T_total * H * K, b_dk, bos, t, i_h, H, K, 0, BK)
            store_token_vector(dv, b_beta * b_du, bos, t, i_h, H, V, i_v * BV, BV)
            tl.store(dbeta_part + o_gate + t * H, tl.sum(b_du * b_e))
            tl.store(dg_part + o_gate + t * H, tl.sum(b_dSa * b_Sa))
            b_dS = b_dSa * tl.exp(b_g)
        tl.debug_barrier()      # the next segment overwrites the scratch
    if USE_INITIAL_STATE:
        store_state(dh0, b_dS, i_n, i_h, H, K, V, 0, i_v * BV, BK, BV)


def checkpoint_interval(max_len: int) -> int:
    """Tokens between state checkpoints: the power of two nearest above sqrt(max_len), in [16, 256], which
    balances checkpoint memory (T/C states) against the backward's scratch (C states)."""
    return min(max(triton.next_power_of_2(math.isqrt(max(max_len - 1, 0)) + 1), 16), 256)


def forward_block_v(K: int, V: int, max_elements: int = 4096) -> int:
    """V block of the forward kernel: a [K, BV] float32 state of at most max_elements per program (4096 over a
    sequence; a decode step, which holds nothing else, takes 8192)."""
    return min(triton.next_power_of_2(V), max(max_elements // triton.next_power_of_2(K), 16))


def backward_block_v(K: int, V: int) -> int:
    """V block of the backward kernel, which holds several [K, BV] states: at most 2048 elements each."""
    return min(triton.next_power_of_2(V), max(2048 // triton.next_power_of_2(K), 8))


def recurrent_fwd(q, k, v, g, beta, scale, initial_state, final_state, cu_seqlens, checkpoint_every=None,
                  checkpoint_offsets=None, num_checkpoints=0, block_v=None, num_warps=4):
    """Returns o [B, T, H, V] (v's dtype) and, if checkpoint_every is given, the state checkpoints
    [num_checkpoints, H, K, V] float32. `final_state` [N, H, K, V] is written if not None. block_v: the V
    block (None = forward_block_v)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    o = torch.empty_like(v)
    save_checkpoints = checkpoint_every is not None
    checkpoints = (torch.empty(num_checkpoints, H, K, V, device=q.device, dtype=torch.float32)
                   if save_checkpoints else None)
    BV = block_v or forward_block_v(K, V)
    recurrent_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, g, beta, o, initial_state, final_state, checkpoints, scale, T, checkpoint_every or 1,
        cu_seqlens, checkpoint_offsets, H=H, K=K, V=V, BK=triton.next_power_of_2(K), BV=BV,
        IS_VARLEN=cu_seqlens is not None, USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=final_state is not None, SAVE_CHECKPOINTS=save_checkpoints, num_warps=num_warps)
    return o, checkpoints


def recurrent_bwd(q, k, v, g, beta, scale, checkpoints, do, dht, has_initial_state, cu_seqlens,
                  checkpoint_every, checkpoint_offsets):
    """Returns dq, dk, dv, dg, dbeta (input dtypes) and dh0 (float32, or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    BV = backward_block_v(K, V)
    NV = triton.cdiv(V, BV)
    dq_part = torch.empty(NV, B, T, H, K, device=q.device, dtype=torch.float32)
    dk_part = torch.empty_like(dq_part)
    dg_part = torch.empty(NV, B, T, H, device=q.device, dtype=torch.float32)
    dbeta_part = torch.empty_like(dg_part)
    dv = torch.empty_like(v)
    scratch = torch.empty(N * checkpoint_every, H, K, V, device=q.device, dtype=torch.float32)
    dh0 = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if has_initial_state else None
    recurrent_bwd_kernel[(NV, N * H)](
        q, k, v, g, beta, checkpoints, scratch, do, dht, dq_part, dk_part, dv, dg_part, dbeta_part, dh0,
        scale, T, checkpoint_every, B * T, cu_seqlens, checkpoint_offsets, H=H, K=K, V=V,
        BK=triton.next_power_of_2(K), BV=BV, IS_VARLEN=cu_seqlens is not None,
        USE_INITIAL_STATE=has_initial_state, USE_FINAL_STATE_GRADIENT=dht is not None)
    return (dq_part.sum(0).to(q.dtype), dk_part.sum(0).to(k.dtype), dv, dg_part.sum(0).to(g.dtype),
            dbeta_part.sum(0).to(beta.dtype), dh0)


class RecurrentGatedDeltaRuleFunction(torch.autograd.Function):
    """Saves the inputs and the state checkpoints; backward recomputes the states between checkpoints."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        B, T, H, K = q.shape
        N = B if cu_seqlens is None else len(cu_seqlens) - 1
        initial_state = None if initial_state is None else initial_state.float().contiguous()
        final_state = (torch.empty(N, H, K, v.shape[-1], device=q.device, dtype=torch.float32)
                       if output_final_state else None)
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        checkpoint_every = checkpoint_offsets = None
        num_checkpoints = 0
        if any(ctx.needs_input_grad):
            max_len = T if cu_seqlens is None else int(cu_seqlens.diff().max()) if N > 0 else 0
            checkpoint_every = checkpoint_interval(max_len)
            layout = sequence_layout(B, T, cu_seqlens, checkpoint_every, q.device)
            checkpoint_offsets, num_checkpoints = layout.chunk_offsets, layout.num_chunks
        o, checkpoints = recurrent_fwd(q, k, v, g, beta, scale, initial_state, final_state, cu_seqlens,
                                       checkpoint_every, checkpoint_offsets, num_checkpoints)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, checkpoints, cu_seqlens, checkpoint_offsets)
        ctx.scale, ctx.checkpoint_every = scale, checkpoint_every
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, checkpoints, cu_seqlens, checkpoint_offsets = ctx.saved_tensors
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dg, dbeta, dh0 = recurrent_bwd(
            q, k, v, g, beta, ctx.scale, checkpoints, do.contiguous(), dht, initial_state is not None,
            cu_seqlens, ctx.checkpoint_every, checkpoint_offsets)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None


def triton_recurrent_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None, output_final_state=False,
                                      cu_seqlens=None):
    """Step-by-step gated delta rule in Triton, differentiable in every input.

    Arguments and returns as `chunk.triton_chunk_gated_delta_rule`: q, k [B, T, H, K], v [B, T, H, V], g and
    beta [B, T, H]; initial_state / final_state [N, H, K, V] float32; o [B, T, H, V] in v's dtype.

    For generation, `triton_decode_step` updates an existing state in place instead of allocating a new one.
    """
    return RecurrentGatedDeltaRuleFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                 cu_seqlens)


def triton_decode_step(q, k, v, g, beta, state, *, scale, launch=DECODE_LAUNCH):
    """One generation step for a batch of sequences, updating `state` in place (no autograd).

    Args:
        q, k: [B, 1, H, K]; v: [B, 1, H, V]; g, beta: [B, 1, H].
        state: [B, H, K, V] float32, contiguous; overwritten with the state after this token.
        scale: multiplies q.
    Returns:
        o: [B, 1, H, V] in v's dtype.
    launch: the V block (None: forward_block_v's choice) and num_warps, `DECODE_LAUNCH` unless a benchmark tries others.
    """
    if q.shape[1] != 1:
        raise ValueError(f"triton_decode_step takes one token per sequence (T = 1); got T = {q.shape[1]}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor; got {state.dtype}, "
                         f"contiguous={state.is_contiguous()}")
    block_v = launch["BV"] or forward_block_v(q.shape[-1], v.shape[-1], max_elements=8192)
    if block_v & (block_v - 1):
        raise ValueError(f"launch['BV']={block_v} must be a power of two or None")
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o, _ = recurrent_fwd(q, k, v, g, beta, scale, state, state, None, block_v=block_v,
                         num_warps=launch["num_warps"])
    return o
