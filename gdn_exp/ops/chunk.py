"""Chunkwise gated delta rule in Triton: forward and backward kernels, autograd.Function, public function.

Same algorithm as `reference.chunk_gated_delta_rule` with chunk size BT = 64. Per chunk and head, with local
gate cumsum G, Q, K [BT, K], V [BT, V] and chunk-start state S [K, V]:

    A[t, j] = beta_t exp(G_t - G_j) k_t.k_j (j < t),   Ainv = (I + A)^-1      (UT/WY transform)
    W = Ainv (beta exp(G) K),   U~ = Ainv (beta V)                            (chunk_wy_fwd_kernel)
    U = U~ - W S;   S <- exp(G_last) S + (exp(G_last - G) K)^T U               (chunk_state_fwd_kernel)
    O = scale (exp(G) Q) S + (scale Q K^T * D) U,  D[t, j] = exp(G_t - G_j) (j <= t)  (chunk_output_fwd_kernel)

Only the state pass is sequential over chunks; the other kernels run one program per chunk. Forward keeps no
intermediates for backward (only the inputs): backward recomputes G, Ainv, W, U~ and the per-chunk states, runs
the state-gradient pass in reverse (chunk_state_bwd_kernel), then gradients per chunk (chunk_dqk_bwd_kernel
for the output and state terms, chunk_wy_bwd_kernel through the UT/WY transform and the gate cumsum).

All dots take float32 operands (tf32x3, ~float32 accuracy, for float32 inputs; tf32 for 16-bit inputs);
states and intermediates are float32. Tensors live as [tokens, H, D] with sequences packed along tokens
(see triton_utils).
"""
import torch
import triton
import triton.language as tl

from .triton_utils import (SequenceLayout, block_size, chunk_position, dot_precision, load_state, load_tokens,
                           sequence_bounds, sequence_layout, store_state, store_tokens)

CHUNK_SIZE = 64
# Launches use num_stages=1: software pipelining of the masked [64, 64] float32 loads would need more shared
# memory than Hopper has in the backward kernels. Tuning stages/warps per shape is left to the speed work.


@triton.jit
def decay_matrix(b_G, BT: tl.constexpr, INCLUSIVE: tl.constexpr):
    """D[t, j] = exp(G_t - G_j) for j < t (j <= t if INCLUSIVE), else 0; the exponent is masked first so
    the upper triangle never overflows."""
    o_i = tl.arange(0, BT)
    if INCLUSIVE:
        m_causal = o_i[:, None] >= o_i[None, :]
    else:
        m_causal = o_i[:, None] > o_i[None, :]
    return tl.exp(tl.where(m_causal, b_G[:, None] - b_G[None, :], float("-inf")))


@triton.jit
def unit_lower_inverse(b_A, BT: tl.constexpr):
    """(I + A)^-1 for strictly lower-triangular A [BT, BT], by forward substitution one row at a time."""
    o_i = tl.arange(0, BT)
    b_X = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    for i in range(1, BT):
        b_a = tl.sum(tl.where(o_i[:, None] == i, b_A, 0.0), 0)          # row i of A
        b_X -= tl.where(o_i[:, None] == i, tl.sum(b_a[:, None] * b_X, 0)[None, :], 0.0)
    return b_X


@triton.jit
def chunk_wy_fwd_kernel(k, v, g, beta, g_cum, a_inv, w, u, cu_seqlens, chunk_indices,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Per chunk: G = cumsum(g), Ainv, W = Ainv (beta exp(G) K), U~ = Ainv (beta V)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    o_i = tl.arange(0, BT)
    m_t = i_c * BT + o_i < seq_len
    o_gate = (bos + i_c * BT + o_i) * H + i_h
    b_G = tl.cumsum(tl.load(g + o_gate, mask=m_t, other=0).to(tl.float32), 0)
    b_beta = tl.load(beta + o_gate, mask=m_t, other=0).to(tl.float32)
    tl.store(g_cum + o_gate, b_G, mask=m_t)

    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK).to(tl.float32)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
    b_A = b_beta[:, None] * b_kk * decay_matrix(b_G, BT, False)
    b_Ainv = unit_lower_inverse(b_A, BT)
    store_tokens(a_inv, b_Ainv, bos, i_h, seq_len, H, BT, i_c * BT, 0, BT, BT)

    b_kscale = b_beta * tl.exp(b_G)
    for i_k in range(tl.cdiv(K, BK)):
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK).to(tl.float32)
        b_w = tl.dot(b_Ainv, b_k * b_kscale[:, None], input_precision=DOT_PRECISION)
        store_tokens(w, b_w, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
    for i_v in range(tl.cdiv(V, BV)):
        b_v = load_tokens(v, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        b_u = tl.dot(b_Ainv, b_v * b_beta[:, None], input_precision=DOT_PRECISION)
        store_tokens(u, b_u, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)


@triton.jit
def chunk_gates(g_cum, bos, i_h, i_c, seq_len, H: tl.constexpr, BT: tl.constexpr):
    """Loads G [BT] of chunk i_c (G_last past the sequence end, as the cumsum of zero-padded g gives),
    the in-sequence mask, the last valid row and G_last."""
    o_i = tl.arange(0, BT)
    m_t = i_c * BT + o_i < seq_len
    last = tl.minimum(seq_len - i_c * BT, BT) - 1
    b_G_last = tl.load(g_cum + (bos + i_c * BT + last) * H + i_h)
    b_G = tl.load(g_cum + (bos + i_c * BT + o_i) * H + i_h, mask=m_t, other=b_G_last)
    return b_G, m_t, last, b_G_last


@triton.jit
def chunk_state_fwd_kernel(k, w, u, g_cum, h, v_new, h0, ht, cu_seqlens, chunk_offsets,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                           STORE_FINAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Sequential over the chunks of one sequence, for V columns [i_v BV, i_v BV + BV): stores the state at
    each chunk start in h and U = U~ - W S in v_new. BK covers all of K."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = sequence_bounds(cu_seqlens, i_n)
    i_t0 = tl.load(chunk_offsets + i_n)
    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_S = load_state(h0, i_n, i_h, H, K, V, 0, i_v * BV, BK, BV)
    for i_c in range(tl.cdiv(seq_len, BT)):
        store_state(h, b_S, i_t0 + i_c, i_h, H, K, V, 0, i_v * BV, BK, BV)
        b_G, m_t, _, b_G_last = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
        b_w = load_tokens(w, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
        b_u = load_tokens(u, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_u -= tl.dot(b_w, b_S, input_precision=DOT_PRECISION)
        store_tokens(v_new, b_u, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK).to(tl.float32)
        b_kd = b_k * tl.where(m_t, tl.exp(b_G_last - b_G), 0.0)[:, None]    # k decayed to chunk end
        b_S = b_S * tl.exp(b_G_last) + tl.dot(tl.trans(b_kd), b_u, input_precision=DOT_PRECISION)
    if STORE_FINAL_STATE:
        store_state(ht, b_S, i_n, i_h, H, K, V, 0, i_v * BV, BK, BV)


@triton.jit
def chunk_output_fwd_kernel(q, k, v_new, g_cum, h, o, scale, cu_seqlens, chunk_indices,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Per chunk and V block: O = scale (exp(G) Q) S + (scale Q K^T * D) U."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    b_G, _, _, _ = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = load_tokens(q, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK).to(tl.float32)
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK).to(tl.float32)
        b_S = load_state(h, i_t, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV)
        b_o += tl.dot(b_q, b_S, input_precision=DOT_PRECISION)
        b_qk += tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    b_P = b_qk * decay_matrix(b_G, BT, True)
    b_u = load_tokens(v_new, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
    b_o = (b_o * tl.exp(b_G)[:, None] + tl.dot(b_P, b_u, input_precision=DOT_PRECISION)) * scale
    store_tokens(o, b_o, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)


@triton.jit
def chunk_state_bwd_kernel(q, k, w, g_cum, do, dht, dh, du, dh0, scale, cu_seqlens, chunk_offsets,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                           USE_FINAL_STATE_GRADIENT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Reverse over the chunks of one sequence: dS (gradient of the chunk-end state) into dh, and
    dU = P^T dO + (exp(G_last - G) K) dS into du, where P = scale Q K^T * D. BK covers all of K."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, seq_len = sequence_bounds(cu_seqlens, i_n)
    i_t0 = tl.load(chunk_offsets + i_n)
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dS = load_state(dht, i_n, i_h, H, K, V, 0, i_v * BV, BK, BV)
    num_chunks = tl.cdiv(seq_len, BT)
    for i_r in range(num_chunks):
        i_c = num_chunks - 1 - i_r
        store_state(dh, b_dS, i_t0 + i_c, i_h, H, K, V, 0, i_v * BV, BK, BV)
        b_G, m_t, _, b_G_last = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
        b_q = load_tokens(q, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK).to(tl.float32)
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK).to(tl.float32)
        b_w = load_tokens(w, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
        b_do = load_tokens(do, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        b_P = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
        b_P = b_P * decay_matrix(b_G, BT, True) * scale
        b_kd = b_k * tl.where(m_t, tl.exp(b_G_last - b_G), 0.0)[:, None]
        b_du = (tl.dot(tl.trans(b_P), b_do, input_precision=DOT_PRECISION)
                + tl.dot(b_kd, b_dS, input_precision=DOT_PRECISION))
        store_tokens(du, b_du, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_qg = b_q * (scale * tl.exp(b_G))[:, None]
        b_dS = (b_dS * tl.exp(b_G_last) + tl.dot(tl.trans(b_qg), b_do, input_precision=DOT_PRECISION)
                - tl.dot(tl.trans(b_w), b_du, input_precision=DOT_PRECISION))
    if USE_INITIAL_STATE:
        store_state(dh0, b_dS, i_n, i_h, H, K, V, 0, i_v * BV, BK, BV)


@triton.jit(do_not_specialize=["T_total"])
def chunk_dqk_bwd_kernel(q, k, v_new, g_cum, h, do, dh, du, dq, dk_part, dw, dG_part, scale,
                         cu_seqlens, chunk_indices, T_total,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Per chunk and K block: gradients through the output and the state pass.
    dq (final); dk from P and the state update (dk_part); dW = -dU S^T; dG (w.r.t. the cumsum G) from
    those terms into dG_part[i_k]."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    b_G, m_t, last, b_G_last = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
    o_i = tl.arange(0, BT)
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    b_dqs = tl.zeros([BT, BK], dtype=tl.float32)      # dO S^T
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)      # U dS^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dgamma = tl.zeros([BK, BV], dtype=tl.float32)   # S * dS, summed below: d/d exp(G_last)
    for i_v in range(tl.cdiv(V, BV)):
        b_u = load_tokens(v_new, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_do = load_tokens(do, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        b_du = load_tokens(du, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_S = load_state(h, i_t, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV)
        b_dS = load_state(dh, i_t, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV)
        b_dP += tl.dot(b_do, tl.trans(b_u), input_precision=DOT_PRECISION)
        b_dqs += tl.dot(b_do, tl.trans(b_S), input_precision=DOT_PRECISION)
        b_dkd += tl.dot(b_u, tl.trans(b_dS), input_precision=DOT_PRECISION)
        b_dw -= tl.dot(b_du, tl.trans(b_S), input_precision=DOT_PRECISION)
        b_dgamma += b_S * b_dS
    b_q = load_tokens(q, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK).to(tl.float32)
    b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK).to(tl.float32)
    # P = scale Q K^T * D: gradient w.r.t. Q K^T is dP * D * scale
    b_dqk = b_dP * decay_matrix(b_G, BT, True) * scale
    b_qscale = tl.where(m_t, scale * tl.exp(b_G), 0.0)
    b_kdecay = tl.where(m_t, tl.exp(b_G_last - b_G), 0.0)
    b_dq = b_dqs * b_qscale[:, None] + tl.dot(b_dqk, b_k, input_precision=DOT_PRECISION)
    b_dk = b_dkd * b_kdecay[:, None] + tl.dot(tl.trans(b_dqk), b_q, input_precision=DOT_PRECISION)
    store_tokens(dq, b_dq, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
    store_tokens(dk_part, b_dk, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
    store_tokens(dw, b_dw, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)

    # dG: each decay exp(G_a - G_b) adds its gradient x to dG_a and -x to dG_b. Self-pairs (a = b) cancel
    # exactly and are left out, so tiny gradients (g << 0) do not drown in rounding of large cancelling terms.
    b_Z = tl.where(o_i[:, None] > o_i[None, :], b_dqk * tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION),
                   0.0)
    b_dG = b_qscale * tl.sum(b_q * b_dqs, 1) + tl.sum(b_Z, 1) - tl.sum(b_Z, 0)
    b_kterm = tl.where(o_i != last, b_kdecay * tl.sum(b_k * b_dkd, 1), 0.0)
    b_dG -= b_kterm
    b_dG += tl.where(o_i == last, tl.sum(b_kterm) + tl.exp(b_G_last) * tl.sum(b_dgamma), 0.0)
    tl.store(dG_part + i_k * T_total * H + (bos + i_c * BT + o_i) * H + i_h, b_dG, mask=m_t)


@triton.jit(do_not_specialize=["T_total"])
def chunk_wy_bwd_kernel(k, v, beta, g_cum, a_inv, dw, du, dk_part, dG_part, dk, dv, dbeta, dg,
                        cu_seqlens, chunk_indices, T_total,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Per chunk: gradients through W = Ainv (beta exp(G) K), U~ = Ainv (beta V) and Ainv = (I + A)^-1
    (dAinv -> dA = -Ainv^T dAinv Ainv^T); adds dk_part, sums the dG_part blocks and turns dG (w.r.t. the
    cumsum) into dg by a reverse cumsum within the chunk."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    b_G, m_t, _, _ = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
    o_i = tl.arange(0, BT)
    o_gate = (bos + i_c * BT + o_i) * H + i_h
    b_beta = tl.load(beta + o_gate, mask=m_t, other=0).to(tl.float32)
    b_Ainv = load_tokens(a_inv, bos, i_h, seq_len, H, BT, i_c * BT, 0, BT, BT)
    b_dG = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(NK):
        b_dG += tl.load(dG_part + i_k * T_total * H + o_gate, mask=m_t, other=0)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_dAinv = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        b_v = load_tokens(v, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        b_du = load_tokens(du, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_dAinv += tl.dot(b_du, tl.trans(b_v * b_beta[:, None]), input_precision=DOT_PRECISION)
        b_dvb = tl.dot(tl.trans(b_Ainv), b_du, input_precision=DOT_PRECISION)   # d(beta V)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        store_tokens(dv, b_dvb * b_beta[:, None], bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
    b_kscale = tl.where(m_t, b_beta * tl.exp(b_G), 0.0)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(NK):
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK).to(tl.float32)
        b_dw = load_tokens(dw, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_dAinv += tl.dot(b_dw, tl.trans(b_k * b_kscale[:, None]), input_precision=DOT_PRECISION)
        b_kk += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
    b_dA = -tl.dot(tl.trans(b_Ainv), tl.dot(b_dAinv, tl.trans(b_Ainv), input_precision=DOT_PRECISION),
                   input_precision=DOT_PRECISION)
    b_dA_kk = b_dA * decay_matrix(b_G, BT, False)                                   # d(A)/d(beta_t k_t.k_j)
    b_Z = b_dA_kk * b_kk * b_beta[:, None]
    b_dbeta += tl.sum(b_dA_kk * b_kk, 1)
    b_dG += tl.sum(b_Z, 1) - tl.sum(b_Z, 0)
    b_dA_kk *= b_beta[:, None]                                                         # d(A)/d(k_t.k_j)
    for i_k in range(NK):
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK).to(tl.float32)
        b_dw = load_tokens(dw, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_dk = load_tokens(dk_part, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_dkb = tl.dot(tl.trans(b_Ainv), b_dw, input_precision=DOT_PRECISION)     # d(beta exp(G) K)
        b_dbeta += tl.where(m_t, tl.exp(b_G), 0.0) * tl.sum(b_dkb * b_k, 1)
        b_dG += b_kscale * tl.sum(b_dkb * b_k, 1)
        b_dk += (b_dkb * b_kscale[:, None] + tl.dot(b_dA_kk, b_k, input_precision=DOT_PRECISION)
                 + tl.dot(tl.trans(b_dA_kk), b_k, input_precision=DOT_PRECISION))
        store_tokens(dk, b_dk, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
    # g_t enters G_s for every s >= t of the chunk: dg_t = sum_{s >= t} dG_s
    b_dg = tl.sum(tl.where(o_i[None, :] >= o_i[:, None], b_dG[None, :], 0.0), 1)
    tl.store(dg + o_gate, b_dg.to(dg.dtype.element_ty), mask=m_t)
    tl.store(dbeta + o_gate, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)


def chunk_wy_fwd(k, v, g, beta, layout):
    """Returns G [tokens, H] (cumsum of g within chunks), Ainv [tokens, H, BT], W [tokens, H, K], U~ [.., V]."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    g_cum = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    a_inv = torch.empty(B, T, H, CHUNK_SIZE, device=k.device, dtype=torch.float32)
    w = torch.empty(B, T, H, K, device=k.device, dtype=torch.float32)
    u = torch.empty(B, T, H, V, device=k.device, dtype=torch.float32)
    chunk_wy_fwd_kernel[(layout.num_chunks, H)](
        k, v, g, beta, g_cum, a_inv, w, u, layout.cu_seqlens, layout.chunk_indices,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, 64), BV=block_size(V, 64),
        DOT_PRECISION=dot_precision(k.dtype), num_stages=1)
    return g_cum, a_inv, w, u


def state_pass_block_v(K: int, V: int) -> int:
    """V block of the sequential state kernels, which hold a whole [K, BV] float32 state."""
    return block_size(V, 64 if K <= 64 else 32)


def chunk_state_fwd(k, w, u, g_cum, initial_state, output_final_state, layout):
    """Returns the per-chunk start states h [NT, H, K, V], U [tokens, H, V] and the final state (or None)."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    N = len(layout.cu_seqlens) - 1
    h = torch.empty(layout.num_chunks, H, K, V, device=k.device, dtype=torch.float32)
    v_new = torch.empty_like(u)
    final_state = torch.empty(N, H, K, V, device=k.device, dtype=torch.float32) if output_final_state else None
    BV = state_pass_block_v(K, V)
    chunk_state_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        k, w, u, g_cum, h, v_new, initial_state, final_state, layout.cu_seqlens, layout.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, 256), BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        DOT_PRECISION=dot_precision(k.dtype), num_stages=1)
    return h, v_new, final_state


def chunk_output_fwd(q, k, v_new, g_cum, h, scale, layout, out_dtype):
    B, T, H, K = q.shape
    V = v_new.shape[-1]
    o = torch.empty(B, T, H, V, device=q.device, dtype=out_dtype)
    BV = block_size(V, 64)
    chunk_output_fwd_kernel[(triton.cdiv(V, BV), layout.num_chunks, H)](
        q, k, v_new, g_cum, h, o, scale, layout.cu_seqlens, layout.chunk_indices,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, 64), BV=BV, DOT_PRECISION=dot_precision(q.dtype), num_stages=1)
    return o


def chunk_state_bwd(q, k, w, g_cum, do, dht, scale, has_initial_state, layout):
    """Returns dh [NT, H, K, V] (gradient of each chunk's end state), dU [tokens, H, V], dh0 (or None)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    N = len(layout.cu_seqlens) - 1
    dh = torch.empty(layout.num_chunks, H, K, V, device=q.device, dtype=torch.float32)
    du = torch.empty(B, T, H, V, device=q.device, dtype=torch.float32)
    dh0 = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if has_initial_state else None
    BV = state_pass_block_v(K, V)
    chunk_state_bwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, w, g_cum, do, dht, dh, du, dh0, scale, layout.cu_seqlens, layout.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, 256), BV=BV, USE_INITIAL_STATE=has_initial_state,
        USE_FINAL_STATE_GRADIENT=dht is not None, DOT_PRECISION=dot_precision(q.dtype), num_stages=1)
    return dh, du, dh0


def chunk_dqk_bwd(q, k, v_new, g_cum, h, do, dh, du, scale, layout):
    """Returns dq, the output/state part of dk (float32), dW and the per-K-block dG parts [NK, tokens, H]."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    BK = block_size(K, 64)
    NK = triton.cdiv(K, BK)
    dq = torch.empty_like(q)
    dk_part = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    dw = torch.empty_like(dk_part)
    dG_part = torch.empty(NK, B, T, H, device=q.device, dtype=torch.float32)
    chunk_dqk_bwd_kernel[(NK, layout.num_chunks, H)](
        q, k, v_new, g_cum, h, do, dh, du, dq, dk_part, dw, dG_part, scale, layout.cu_seqlens,
        layout.chunk_indices, B * T, H=H, K=K, V=V, BT=CHUNK_SIZE, BK=BK, BV=block_size(V, 64),
        DOT_PRECISION=dot_precision(q.dtype), num_stages=1)
    return dq, dk_part, dw, dG_part


def chunk_wy_bwd(k, v, g, beta, g_cum, a_inv, dw, du, dk_part, dG_part, layout):
    """Returns dk, dv, dg, dbeta in the dtypes of k, v, g, beta."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dk, dv, dg, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), torch.empty_like(beta)
    chunk_wy_bwd_kernel[(layout.num_chunks, H)](
        k, v, beta, g_cum, a_inv, dw, du, dk_part, dG_part, dk, dv, dbeta, dg, layout.cu_seqlens,
        layout.chunk_indices, B * T, H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, 64), BV=block_size(V, 64),
        NK=dG_part.shape[0], DOT_PRECISION=dot_precision(k.dtype), num_stages=1)
    return dk, dv, dg, dbeta


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, layout):
    g_cum, _, w, u = chunk_wy_fwd(k, v, g, beta, layout)
    h, v_new, final_state = chunk_state_fwd(k, w, u, g_cum, initial_state, output_final_state, layout)
    o = chunk_output_fwd(q, k, v_new, g_cum, h, scale, layout, v.dtype)
    return o, final_state


def chunk_gated_delta_rule_bwd(q, k, v, g, beta, scale, initial_state, do, dht, layout):
    g_cum, a_inv, w, u = chunk_wy_fwd(k, v, g, beta, layout)
    h, v_new, _ = chunk_state_fwd(k, w, u, g_cum, initial_state, False, layout)
    dh, du, dh0 = chunk_state_bwd(q, k, w, g_cum, do, dht, scale, initial_state is not None, layout)
    dq, dk_part, dw, dG_part = chunk_dqk_bwd(q, k, v_new, g_cum, h, do, dh, du, scale, layout)
    dk, dv, dg, dbeta = chunk_wy_bwd(k, v, g, beta, g_cum, a_inv, dw, du, dk_part, dG_part, layout)
    return dq, dk, dv, dg, dbeta, dh0


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Saves only the inputs; backward recomputes the chunk intermediates and states."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        initial_state = None if initial_state is None else initial_state.float().contiguous()
        layout = sequence_layout(q.shape[0], q.shape[1], cu_seqlens, CHUNK_SIZE, q.device)
        o, final_state = chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state,
                                                    output_final_state, layout)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, *layout[:3])
        ctx.num_chunks, ctx.scale = layout.num_chunks, scale
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, *layout = ctx.saved_tensors
        layout = SequenceLayout(*layout, ctx.num_chunks)
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dg, dbeta, dh0 = chunk_gated_delta_rule_bwd(
            q, k, v, g, beta, ctx.scale, initial_state, do.contiguous(), dht, layout)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None


def triton_chunk_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None, output_final_state=False,
                                  cu_seqlens=None):
    """Chunkwise gated delta rule (chunk size 64) in Triton, differentiable in every input.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay, <= 0), beta: [B, T, H]. float32, bfloat16 or float16.
        scale: multiplies q.
        initial_state: [N, H, K, V] float32 (N = B, or len(cu_seqlens) - 1 with B = 1), or None for zeros.
        output_final_state: also return the state after the last token.
        cu_seqlens: LongTensor [N + 1] of packed-sequence boundaries (B = 1), or None.
    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [N, H, K, V] float32, or None.
    """
    return ChunkGatedDeltaRuleFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state,
                                             cu_seqlens)
