"""Chunkwise gated delta rule in Triton: forward and backward kernels, autograd.Function, public function.

Same algorithm as `reference.chunk_gated_delta_rule` with chunk size BT = 64. Per chunk and head, with local
gate cumsum G, Q, K [BT, K], V [BT, V] and chunk-start state S [K, V]:

    A[t, j] = beta_t exp(G_t - G_j) k_t.k_j (j < t),   Ainv = (I + A)^-1      (UT/WY transform)
    W = Ainv (beta exp(G) K),   U~ = Ainv (beta V)                            (chunk_wy_fwd_kernel)
    U = U~ - W S;   S <- exp(G_last) S + (exp(G_last - G) K)^T U               (chunk_state_fwd_kernel)
    O = scale (exp(G) Q) S + (scale Q K^T * D) U,  D[t, j] = exp(G_t - G_j) (j <= t)
                 (chunk_output_fwd_kernel; float32 inference: the state pass itself, forward_writes_output)

Only the state pass is sequential over chunks; the other kernels run one program per chunk. In blocks of 32-64
V columns the forward's state pass applies Ainv itself, as U = Ainv diag(beta) (V - diag(exp(G)) K S), so that
W and U~ never reach HBM (applies_a_inv); where inference's state pass writes O, per-chunk states do not either.
A training forward keeps the inputs, Ainv, the per-chunk states h and U: backward recomputes G and W from Ainv,
runs the state-gradient pass in reverse (chunk_state_bwd_kernel), then gradients per chunk
(chunk_dqk_bwd_kernel for the output and state terms, chunk_wy_bwd_kernel through the UT/WY transform and the
gate cumsum).

Precision follows the inputs (`triton_utils.mma`): for bf16/fp16 inputs the dots take 16-bit operands with
float32 accumulation. The products with the running float32 state (and the float32 [BT, BV] operands) in the
sequential passes are finer: the forward's run as one float16 dot (`forward_state_mma`, 11 mantissa bits), the
backward's split the gradient into two 16-bit planes (`state_mma`, ~16 bits; gradients may lie below float16's
range). The states h and Ainv are stored in float16 (16-bit inputs, state_dtype); W, U~, U and the gradients
dh, dU, dW and dk's output/state part in the input dtype; gate cumsums and the dG parts in float32. Float32
inputs keep everything float32 (tf32x3 dots). Tensors live as [tokens, H, D] with sequences packed along tokens
(see triton_utils).
"""
import torch
import triton
import triton.language as tl

from gdn_exp.ops.vmap import fold_models, loop_models

from .launch import DEFAULT_LAUNCH
from .triton_utils import (SequenceLayout, block_size, chunk_position, forward_state_mma, load_state,
                           load_state_stored, load_tokens, load_tokens_t, mma, sequence_layout, start_state,
                           state_mma, state_pass_program, store_state, store_tokens)

CHUNK_SIZE = 64

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
def unit_lower_inverses(A0, A1, A2, A3, BS: tl.constexpr):
    """(I + A_b)^-1 for four strictly lower-triangular A_b [BS, BS] at once: forward substitution one row at a
    time on the four stacked along two trailing axes ([BS, BS, 2, 2]), so the BS - 1 serial steps serve all
    four blocks."""
    b_A = tl.join(tl.join(A0, A1), tl.join(A2, A3))                      # [BS, BS, 2, 2]
    o_i = tl.arange(0, BS)
    rows = o_i[:, None, None, None]
    b_X = tl.where((rows == o_i[None, :, None, None]), 1.0, 0.0) + tl.zeros_like(b_A)
    for i in range(1, BS):
        b_a = tl.sum(tl.where(rows == i, b_A, 0.0), 0)                  # row i of each A_b: [BS, 2, 2]
        b_X -= tl.where(rows == i, tl.sum(b_a[:, None, :, :] * b_X, 0)[None, :, :, :], 0.0)
    X01, X23 = tl.split(b_X)
    X0, X1 = tl.split(X01)
    X2, X3 = tl.split(X23)
    return X0, X1, X2, X3


@triton.jit
def wy_gates(g, beta, g_cum, bos, i_h, seq_len, row, G_carry, H: tl.constexpr, BS: tl.constexpr):
    """Rows [row, row + BS) of a chunk: the gate cumsum G continued from G_carry (also stored to g_cum),
    beta, and G at the last row (the next block's carry)."""
    o_r = row + tl.arange(0, BS)
    m_r = o_r < seq_len
    o_gate = (bos + o_r) * H + i_h
    b_g = tl.load(g + o_gate, mask=m_r, other=0).to(tl.float32)
    b_G = G_carry + tl.cumsum(b_g, 0)
    tl.store(g_cum + o_gate, b_G, mask=m_r)
    b_beta = tl.load(beta + o_gate, mask=m_r, other=0).to(tl.float32)
    return b_G, b_beta, G_carry + tl.sum(b_g, 0)


@triton.jit
def decay_block(b_kk, b_Gi, b_Gj, b_beta_i, BS: tl.constexpr, DIAGONAL: tl.constexpr):
    """Block of A[t, s] = beta_t exp(G_t - G_s) k_t.k_s (s < t) from its k_t.k_s block: rows t of block i,
    columns s of an earlier block j, or of the same block (DIAGONAL)."""
    if DIAGONAL:
        b_kk *= decay_matrix(b_Gi, BS, False)
    else:
        b_kk *= tl.exp(b_Gi[:, None] - b_Gj[None, :])
    return b_kk * b_beta_i[:, None]


@triton.jit
def load_row_blocks(base, bos, i_h, seq_len, H: tl.constexpr, D: tl.constexpr, row, col, BS: tl.constexpr,
                    BC: tl.constexpr):
    """Four [BS, BC] row blocks from rows row, row + BS, ... of a [tokens, H, D] tensor."""
    return (load_tokens(base, bos, i_h, seq_len, H, D, row, col, BS, BC),
            load_tokens(base, bos, i_h, seq_len, H, D, row + BS, col, BS, BC),
            load_tokens(base, bos, i_h, seq_len, H, D, row + 2 * BS, col, BS, BC),
            load_tokens(base, bos, i_h, seq_len, H, D, row + 3 * BS, col, BS, BC))


@triton.jit
def store_row_blocks(base, y0, y1, y2, y3, bos, i_h, seq_len, H: tl.constexpr, D: tl.constexpr, row, col,
                     BS: tl.constexpr, BC: tl.constexpr):
    """Stores four [BS, BC] row blocks at rows row, row + BS, ... of a [tokens, H, D] tensor."""
    store_tokens(base, y0, bos, i_h, seq_len, H, D, row, col, BS, BC)
    store_tokens(base, y1, bos, i_h, seq_len, H, D, row + BS, col, BS, BC)
    store_tokens(base, y2, bos, i_h, seq_len, H, D, row + 2 * BS, col, BS, BC)
    store_tokens(base, y3, bos, i_h, seq_len, H, D, row + 3 * BS, col, BS, BC)


@triton.jit
def lower_blocks_apply(X00, X10, X11, X20, X21, X22, X30, X31, X32, X33, base, bos, i_h, seq_len, out, t0, col,
                       H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr, DTYPE: tl.constexpr):
    """out[rows of the chunk, col:col+BC] = X @ base[same rows, col:col+BC] for block-lower-triangular X
    (blocks X_ij, i >= j, [BS, BS]); both [tokens, H, D] tensors."""
    b0, b1, b2, b3 = load_row_blocks(base, bos, i_h, seq_len, H, D, t0, col, BS, BC)
    y0 = mma(X00, b0, DTYPE)
    y1 = mma(X10, b0, DTYPE) + mma(X11, b1, DTYPE)
    y2 = mma(X20, b0, DTYPE) + mma(X21, b1, DTYPE) + mma(X22, b2, DTYPE)
    y3 = mma(X30, b0, DTYPE) + mma(X31, b1, DTYPE) + mma(X32, b2, DTYPE) + mma(X33, b3, DTYPE)
    store_row_blocks(out, y0, y1, y2, y3, bos, i_h, seq_len, H, D, t0, col, BS, BC)


@triton.jit
def chunk_wy_fwd_kernel(k, v, g, beta, g_cum, a_inv, w, u, cu_seqlens, chunk_indices,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, STORE_AINV: tl.constexpr, LOAD_AINV: tl.constexpr,
                        WRITE_W: tl.constexpr, WRITE_U: tl.constexpr):
    """Per chunk: G = cumsum(g), Ainv = (I + A)^-1, W = Ainv (beta exp(G) K), U~ = Ainv (beta V).

    The chunk is four row blocks of BS = BT / 4, and every [BT, BT] matrix lives as its [BS, BS] blocks in
    registers: the blocks of K K^T, the four diagonal blocks of Ainv by one forward substitution over all four
    (BS - 1 serial steps instead of BT - 1), then X_ij = -X_ii sum_{j <= m < i} A_im X_mj by dots. The row
    scales (beta exp(G), beta) go onto the columns of Ainv's blocks, so K and V feed the dots as loaded.
    Ainv (lower blocks only, in state_dtype) is stored when it is needed later (STORE_AINV); a launch that loads it
    (LOAD_AINV) computes only G, W and U~; WRITE_W / WRITE_U say which of the two it writes (neither: it
    stops after Ainv)."""
    tl.static_assert(BT == 4 * BS)
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    DTYPE: tl.constexpr = k.dtype.element_ty
    F32: tl.constexpr = tl.float32
    t0 = i_c * BT
    b_G0, b_beta0, G_carry = wy_gates(g, beta, g_cum, bos, i_h, seq_len, t0, 0.0, H, BS)
    b_G1, b_beta1, G_carry = wy_gates(g, beta, g_cum, bos, i_h, seq_len, t0 + BS, G_carry, H, BS)
    b_G2, b_beta2, G_carry = wy_gates(g, beta, g_cum, bos, i_h, seq_len, t0 + 2 * BS, G_carry, H, BS)
    b_G3, b_beta3, _ = wy_gates(g, beta, g_cum, bos, i_h, seq_len, t0 + 3 * BS, G_carry, H, BS)

    if LOAD_AINV:
        X00, X10, X20, X30 = load_row_blocks(a_inv, bos, i_h, seq_len, H, BT, t0, 0, BS, BS)
        X11 = load_tokens(a_inv, bos, i_h, seq_len, H, BT, t0 + BS, BS, BS, BS)
        X21 = load_tokens(a_inv, bos, i_h, seq_len, H, BT, t0 + 2 * BS, BS, BS, BS)
        X31 = load_tokens(a_inv, bos, i_h, seq_len, H, BT, t0 + 3 * BS, BS, BS, BS)
        X22 = load_tokens(a_inv, bos, i_h, seq_len, H, BT, t0 + 2 * BS, 2 * BS, BS, BS)
        X32 = load_tokens(a_inv, bos, i_h, seq_len, H, BT, t0 + 3 * BS, 2 * BS, BS, BS)
        X33 = load_tokens(a_inv, bos, i_h, seq_len, H, BT, t0 + 3 * BS, 3 * BS, BS, BS)
    else:
        A00 = tl.zeros([BS, BS], dtype=tl.float32)
        A11, A22, A33, A10, A20, A21, A30, A31, A32 = A00, A00, A00, A00, A00, A00, A00, A00, A00
        for i_k in range(tl.cdiv(K, BK)):
            b_k0, b_k1, b_k2, b_k3 = load_row_blocks(k, bos, i_h, seq_len, H, K, t0, i_k * BK, BS, BK)
            A00 += mma(b_k0, tl.trans(b_k0), DTYPE)
            A11 += mma(b_k1, tl.trans(b_k1), DTYPE)
            A22 += mma(b_k2, tl.trans(b_k2), DTYPE)
            A33 += mma(b_k3, tl.trans(b_k3), DTYPE)
            A10 += mma(b_k1, tl.trans(b_k0), DTYPE)
            A20 += mma(b_k2, tl.trans(b_k0), DTYPE)
            A21 += mma(b_k2, tl.trans(b_k1), DTYPE)
            A30 += mma(b_k3, tl.trans(b_k0), DTYPE)
            A31 += mma(b_k3, tl.trans(b_k1), DTYPE)
            A32 += mma(b_k3, tl.trans(b_k2), DTYPE)
        X00, X11, X22, X33 = unit_lower_inverses(decay_block(A00, b_G0, b_G0, b_beta0, BS, True),
                                                 decay_block(A11, b_G1, b_G1, b_beta1, BS, True),
                                                 decay_block(A22, b_G2, b_G2, b_beta2, BS, True),
                                                 decay_block(A33, b_G3, b_G3, b_beta3, BS, True), BS)
        A10 = decay_block(A10, b_G1, b_G0, b_beta1, BS, False)
        A20 = decay_block(A20, b_G2, b_G0, b_beta2, BS, False)
        A21 = decay_block(A21, b_G2, b_G1, b_beta2, BS, False)
        A30 = decay_block(A30, b_G3, b_G0, b_beta3, BS, False)
        A31 = decay_block(A31, b_G3, b_G1, b_beta3, BS, False)
        A32 = decay_block(A32, b_G3, b_G2, b_beta3, BS, False)
        # (I + A) X = I, block row i, column j < i: X_ij = -X_ii sum_{j <= m < i} A_im X_mj (float32 products)
        X10 = -mma(X11, mma(A10, X00, F32), F32)
        X21 = -mma(X22, mma(A21, X11, F32), F32)
        X20 = -mma(X22, mma(A20, X00, F32) + mma(A21, X10, F32), F32)
        X32 = -mma(X33, mma(A32, X22, F32), F32)
        X31 = -mma(X33, mma(A31, X11, F32) + mma(A32, X21, F32), F32)
        X30 = -mma(X33, mma(A30, X00, F32) + mma(A31, X10, F32) + mma(A32, X20, F32), F32)
        if STORE_AINV:  # column blocks of the lower triangle; backward masks the rest
            store_row_blocks(a_inv, X00, X10, X20, X30, bos, i_h, seq_len, H, BT, t0, 0, BS, BS)
            store_tokens(a_inv, X11, bos, i_h, seq_len, H, BT, t0 + BS, BS, BS, BS)
            store_tokens(a_inv, X21, bos, i_h, seq_len, H, BT, t0 + 2 * BS, BS, BS, BS)
            store_tokens(a_inv, X31, bos, i_h, seq_len, H, BT, t0 + 3 * BS, BS, BS, BS)
            store_tokens(a_inv, X22, bos, i_h, seq_len, H, BT, t0 + 2 * BS, 2 * BS, BS, BS)
            store_tokens(a_inv, X32, bos, i_h, seq_len, H, BT, t0 + 3 * BS, 2 * BS, BS, BS)
            store_tokens(a_inv, X33, bos, i_h, seq_len, H, BT, t0 + 3 * BS, 3 * BS, BS, BS)

    if WRITE_U:
        for i_v in range(tl.cdiv(V, BV)):  # U~ = (Ainv diag(beta)) V
            lower_blocks_apply(X00 * b_beta0[None, :], X10 * b_beta0[None, :], X11 * b_beta1[None, :],
                               X20 * b_beta0[None, :], X21 * b_beta1[None, :], X22 * b_beta2[None, :],
                               X30 * b_beta0[None, :], X31 * b_beta1[None, :], X32 * b_beta2[None, :],
                               X33 * b_beta3[None, :], v, bos, i_h, seq_len, u, t0, i_v * BV, H, V, BS, BV, DTYPE)
    if WRITE_W:
        b_s0, b_s1 = b_beta0 * tl.exp(b_G0), b_beta1 * tl.exp(b_G1)
        b_s2, b_s3 = b_beta2 * tl.exp(b_G2), b_beta3 * tl.exp(b_G3)
        for i_k in range(tl.cdiv(K, BK)):  # W = (Ainv diag(beta exp(G))) K
            lower_blocks_apply(X00 * b_s0[None, :], X10 * b_s0[None, :], X11 * b_s1[None, :],
                               X20 * b_s0[None, :], X21 * b_s1[None, :], X22 * b_s2[None, :],
                               X30 * b_s0[None, :], X31 * b_s1[None, :], X32 * b_s2[None, :],
                               X33 * b_s3[None, :], k, bos, i_h, seq_len, w, t0, i_k * BK, H, K, BS, BK, DTYPE)


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
def load_a_inv(a_inv, bos, i_h, i_c, seq_len, H: tl.constexpr, BT: tl.constexpr):
    """Chunk i_c's Ainv [BT, BT] in float32: only the lower triangle is stored, the rest is masked to zero."""
    o_i = tl.arange(0, BT)
    b_A = load_tokens(a_inv, bos, i_h, seq_len, H, BT, i_c * BT, 0, BT, BT).to(tl.float32)
    return tl.where(o_i[:, None] >= o_i[None, :], b_A, 0.0)


@triton.jit
def chunk_state_fwd_kernel(q, k, v, w, u, a_inv, beta, g_cum, h, v_new, o, h0, ht, scale, cu_seqlens,
                           chunk_offsets, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                           STORE_FINAL_STATE: tl.constexpr, OUTPUT: tl.constexpr, APPLY_AINV: tl.constexpr,
                           DELTA: tl.constexpr):
    """Sequential over the chunks of one sequence, for V columns [i_v BV, i_v BV + BV): U = U~ - W S, then
    S <- exp(G_last) S + (exp(G_last - G) K)^T U. W and U~ are read from w and u, or (APPLY_AINV) never
    formed: U = Ainv diag(beta) (V - diag(exp(G)) K S) from Ainv, K and V (one more dependent product per
    chunk, which pays only in blocks of 32-64 columns: applies_a_inv). Without DELTA (scalar-decay linear attention)
    U = u = beta V as read, no W. With OUTPUT it also writes the chunk's output O = scale (exp(G) Q) S +
    (scale Q K^T * D) U from the float32 S in registers; without, it stores the chunk-start states in h (rounded
    to h's dtype, float16 for 16-bit inputs, as the products use them) and, with DELTA, U in v_new (else
    backward reads u). BK covers all of K."""
    DTYPE: tl.constexpr = k.dtype.element_ty
    i_v, i_n, i_h, bos, seq_len, i_t0 = state_pass_program(cu_seqlens, chunk_offsets, H)
    b_S = start_state(h0, i_n, i_h, H, K, V, i_v * BV, BK, BV, USE_INITIAL_STATE)
    for i_c in range(tl.cdiv(seq_len, BT)):
        b_G, m_t, _, b_G_last = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
        b_kt = load_tokens_t(k, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)          # K^T [BK, BT]
        if APPLY_AINV:
            b_A = load_a_inv(a_inv, bos, i_h, i_c, seq_len, H, BT)
            b_beta = tl.load(beta + (bos + i_c * BT + tl.arange(0, BT)) * H + i_h, mask=m_t, other=0).to(tl.float32)
            b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
            b_v = load_tokens(v, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        else:
            if DELTA:
                b_w = load_tokens(w, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
            b_u = load_tokens(u, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        if OUTPUT:
            b_q = load_tokens(q, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
            b_o = forward_state_mma(b_q, b_S, DTYPE)
        else:
            store_state(h, b_S, i_t0 + i_c, i_h, H, K, V, 0, i_v * BV, BK, BV)
        if APPLY_AINV:
            b_x = (b_v - forward_state_mma(b_k, b_S, DTYPE) * tl.exp(b_G)[:, None]) * b_beta[:, None]
            b_u = forward_state_mma(b_A, b_x, DTYPE)
        elif DELTA:
            b_u -= forward_state_mma(b_w, b_S, DTYPE)
        if OUTPUT:
            b_P = mma(b_q, b_kt, DTYPE) * decay_matrix(b_G, BT, True)
            b_o = (b_o * tl.exp(b_G)[:, None] + mma(b_P, b_u, DTYPE)) * scale
            store_tokens(o, b_o, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        elif DELTA:
            store_tokens(v_new, b_u, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        # K decayed to the chunk end; the decay goes on U's rows, the narrower operand
        b_ud = b_u * tl.where(m_t, tl.exp(b_G_last - b_G), 0.0)[:, None]
        b_S = b_S * tl.exp(b_G_last) + forward_state_mma(b_kt, b_ud, DTYPE)
    if STORE_FINAL_STATE:
        store_state(ht, b_S, i_n, i_h, H, K, V, 0, i_v * BV, BK, BV)


@triton.jit
def chunk_output_fwd_kernel(q, k, v_new, g_cum, h, o, scale, cu_seqlens, chunk_indices,
                            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr):
    """Per chunk and V block: O = scale (exp(G) Q) S + (scale Q K^T * D) U, with S = h: the forward's output when
    the state pass does not write it (all but float32 inference in wide V blocks: see forward_writes_output)."""
    DTYPE: tl.constexpr = q.dtype.element_ty
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    b_G, _, _, _ = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = load_tokens(q, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_o += forward_state_mma(b_q, load_state_stored(h, i_t, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV), DTYPE)
        b_qk += mma(b_q, tl.trans(b_k), DTYPE)
    b_P = b_qk * decay_matrix(b_G, BT, True)
    b_u = load_tokens(v_new, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
    b_o = (b_o * tl.exp(b_G)[:, None] + mma(b_P, b_u, DTYPE)) * scale
    store_tokens(o, b_o, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)


@triton.jit
def chunk_state_bwd_kernel(q, k, w, g_cum, do, dht, dh, du, dh0, scale, cu_seqlens, chunk_offsets,
                           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                           BK: tl.constexpr, BV: tl.constexpr, USE_INITIAL_STATE: tl.constexpr,
                           USE_FINAL_STATE_GRADIENT: tl.constexpr, DELTA: tl.constexpr):
    """Reverse over the chunks of one sequence: dS (gradient of the chunk-end state) into dh, and
    dU = P^T dO + (exp(G_last - G) K) dS into du, where P = scale Q K^T * D. BK covers all of K. With DELTA
    the chunk-start state also reaches U through U = U~ - W S: dS gets -W^T dU."""
    DTYPE: tl.constexpr = q.dtype.element_ty
    i_v, i_n, i_h, bos, seq_len, i_t0 = state_pass_program(cu_seqlens, chunk_offsets, H)
    b_dS = start_state(dht, i_n, i_h, H, K, V, i_v * BV, BK, BV, USE_FINAL_STATE_GRADIENT)
    num_chunks = tl.cdiv(seq_len, BT)
    for i_r in range(num_chunks):
        i_c = num_chunks - 1 - i_r
        store_state(dh, b_dS, i_t0 + i_c, i_h, H, K, V, 0, i_v * BV, BK, BV)
        b_G, m_t, _, b_G_last = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
        b_qt = load_tokens_t(q, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)         # Q^T [BK, BT]
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
        if DELTA:
            b_wt = load_tokens_t(w, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)     # W^T [BK, BT]
        b_do = load_tokens(do, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        # P^T = (scale Q K^T * D)^T, formed as K Q^T: no transposes in registers
        o_i = tl.arange(0, BT)
        b_Pt = mma(b_k, b_qt, DTYPE) * scale * tl.exp(
            tl.where(o_i[:, None] <= o_i[None, :], b_G[None, :] - b_G[:, None], float("-inf")))
        # row scales go on the [BT, BV] operands and results, not on the [BT, K] ones
        b_kdecay = tl.where(m_t, tl.exp(b_G_last - b_G), 0.0)
        b_du = mma(b_Pt, b_do, DTYPE) + state_mma(b_k, b_dS, DTYPE) * b_kdecay[:, None]
        store_tokens(du, b_du, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_dos = b_do * (scale * tl.exp(b_G))[:, None]
        b_dS = b_dS * tl.exp(b_G_last) + state_mma(b_qt, b_dos, DTYPE)
        if DELTA:
            b_dS -= state_mma(b_wt, b_du, DTYPE)
    if USE_INITIAL_STATE:
        store_state(dh0, b_dS, i_n, i_h, H, K, V, 0, i_v * BV, BK, BV)


@triton.jit(do_not_specialize=["T_total"])
def chunk_dqk_bwd_kernel(q, k, v_new, g_cum, h, do, dh, du, dq, dk_part, dw, dG_part, scale,
                         cu_seqlens, chunk_indices, T_total,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, DELTA: tl.constexpr):
    """Per chunk and K block: gradients through the output and the state pass.
    dq (final); dk from P and the state update (dk_part: all of dk without DELTA); dW = -dU S^T (DELTA only);
    dG (w.r.t. the cumsum G) from those terms into dG_part[i_k]."""
    DTYPE: tl.constexpr = q.dtype.element_ty
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    b_G, m_t, last, b_G_last = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
    o_i = tl.arange(0, BT)
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    b_dqs = tl.zeros([BT, BK], dtype=tl.float32)      # dO S^T
    b_dkd = tl.zeros([BT, BK], dtype=tl.float32)      # U dS^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dgamma = 0.0                                    # sum of S * dS: d/d exp(G_last)
    # Where one block covers K, Q and K are issued before the loop, so their latency hides behind it (0.80 ->
    # 0.745 ms at B8 T4096 H16 D128); with K in blocks, holding them through the longer loop spills (D256 +3 %)
    if BK >= K:
        b_q = load_tokens(q, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
    for i_v in range(tl.cdiv(V, BV)):
        b_u = load_tokens(v_new, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_do = load_tokens(do, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        if DELTA:
            b_du = load_tokens(du, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_S = load_state(h, i_t, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV)
        b_dS = load_state(dh, i_t, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV)
        b_dP += mma(b_do, tl.trans(b_u), DTYPE)
        b_dqs += mma(b_do, tl.trans(b_S), DTYPE)
        b_dkd += mma(b_u, tl.trans(b_dS), DTYPE)
        if DELTA:
            b_dw -= mma(b_du, tl.trans(b_S), DTYPE)
        b_dgamma += tl.sum(b_S * b_dS)
    if BK < K:
        b_q = load_tokens(q, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
    # P = scale Q K^T * D: gradient w.r.t. Q K^T is dP * D * scale
    b_dqk = b_dP * decay_matrix(b_G, BT, True) * scale
    b_qscale = tl.where(m_t, scale * tl.exp(b_G), 0.0)
    b_kdecay = tl.where(m_t, tl.exp(b_G_last - b_G), 0.0)
    b_dq = b_dqs * b_qscale[:, None] + mma(b_dqk, b_k, DTYPE)
    b_dk = b_dkd * b_kdecay[:, None] + mma(tl.trans(b_dqk), b_q, DTYPE)
    store_tokens(dq, b_dq, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
    store_tokens(dk_part, b_dk, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
    if DELTA:
        store_tokens(dw, b_dw, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)

    # dG: each decay exp(G_a - G_b) adds its gradient x to dG_a and -x to dG_b. Self-pairs (a = b) cancel
    # exactly and are left out, so tiny gradients (g << 0) do not drown in rounding of large cancelling terms.
    b_Z = tl.where(o_i[:, None] > o_i[None, :], b_dqk * mma(b_q, tl.trans(b_k), DTYPE), 0.0)
    b_dG = b_qscale * tl.sum(b_q * b_dqs, 1) + tl.sum(b_Z, 1) - tl.sum(b_Z, 0)
    b_kterm = tl.where(o_i != last, b_kdecay * tl.sum(b_k * b_dkd, 1), 0.0)
    b_dG -= b_kterm
    b_dG += tl.where(o_i == last, tl.sum(b_kterm) + tl.exp(b_G_last) * b_dgamma, 0.0)
    tl.store(dG_part + i_k * T_total * H + (bos + i_c * BT + o_i) * H + i_h, b_dG, mask=m_t)


@triton.jit(do_not_specialize=["T_total"])
def chunk_wy_bwd_kernel(k, v, beta, g_cum, a_inv, dw, du, dk_part, dG_part, dk, dv, dbeta, dg,
                        cu_seqlens, chunk_indices, T_total,
                        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, NK_PARTS: tl.constexpr):
    """Per chunk: gradients through W = Ainv (beta exp(G) K), U~ = Ainv (beta V) and Ainv = (I + A)^-1
    (dAinv -> dA = -Ainv^T dAinv Ainv^T); adds dk_part, sums the dG_part blocks and turns dG (w.r.t. the
    cumsum) into dg by a reverse cumsum within the chunk."""
    DTYPE: tl.constexpr = k.dtype.element_ty
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, i_c, bos, seq_len = chunk_position(cu_seqlens, chunk_indices, i_t)
    b_G, m_t, _, _ = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
    o_i = tl.arange(0, BT)
    o_gate = (bos + i_c * BT + o_i) * H + i_h
    b_beta = tl.load(beta + o_gate, mask=m_t, other=0).to(tl.float32)
    b_Ainv = load_a_inv(a_inv, bos, i_h, i_c, seq_len, H, BT)
    b_dG = summed_parts(dG_part, o_gate, m_t, T_total, H, BT, NK_PARTS)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_dAinv = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        b_v = load_tokens(v, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_du = load_tokens(du, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_dAinv += mma(b_du, tl.trans(b_v), DTYPE) * b_beta[None, :]
        b_dvb = mma(tl.trans(b_Ainv), b_du, DTYPE)   # d(beta V)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        store_tokens(dv, b_dvb * b_beta[:, None], bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
    b_kscale = tl.where(m_t, b_beta * tl.exp(b_G), 0.0)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_dw = load_tokens(dw, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_dAinv += mma(b_dw, tl.trans(b_k), DTYPE) * b_kscale[None, :]
        b_kk += mma(b_k, tl.trans(b_k), DTYPE)
    b_dA = -mma(tl.trans(b_Ainv), mma(b_dAinv, tl.trans(b_Ainv), DTYPE), DTYPE)
    b_dA_kk = b_dA * decay_matrix(b_G, BT, False)                                   # d(A)/d(beta_t k_t.k_j)
    b_Z = b_dA_kk * b_kk * b_beta[:, None]
    b_dbeta += tl.sum(b_dA_kk * b_kk, 1)
    b_dG += tl.sum(b_Z, 1) - tl.sum(b_Z, 0)
    b_dA_kk *= b_beta[:, None]                                                         # d(A)/d(k_t.k_j)
    for i_k in range(tl.cdiv(K, BK)):
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_dw = load_tokens(dw, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_dk = load_tokens(dk_part, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
        b_dkb = mma(tl.trans(b_Ainv), b_dw, DTYPE)     # d(beta exp(G) K)
        b_dbeta += tl.where(m_t, tl.exp(b_G), 0.0) * tl.sum(b_dkb * b_k, 1)
        b_dG += b_kscale * tl.sum(b_dkb * b_k, 1)
        b_dk += (b_dkb * b_kscale[:, None] + mma(b_dA_kk, b_k, DTYPE)
                 + mma(tl.trans(b_dA_kk), b_k, DTYPE))
        store_tokens(dk, b_dk, bos, i_h, seq_len, H, K, i_c * BT, i_k * BK, BT, BK)
    store_gate_grads(dg, dbeta, b_dG, b_dbeta, o_gate, m_t, BT)


@triton.jit
def summed_parts(dG_part, o_gate, m_t, T_total, H: tl.constexpr, BT: tl.constexpr, NK_PARTS: tl.constexpr):
    """A chunk's dG [BT]: the sum of chunk_dqk_bwd_kernel's per-K-block parts [NK_PARTS, tokens, H]."""
    b_dG = tl.zeros([BT], dtype=tl.float32)
    for i_p in range(NK_PARTS):
        b_dG += tl.load(dG_part + i_p * T_total * H + o_gate, mask=m_t, other=0)
    return b_dG


@triton.jit
def store_gate_grads(dg, dbeta, b_dG, b_dbeta, o_gate, m_t, BT: tl.constexpr):
    """Stores a chunk's dbeta and dg, turning dG (w.r.t. the cumsum G) into dg: g_t enters G_s for every
    s >= t of the chunk, so dg_t = sum_{s >= t} dG_s."""
    o_i = tl.arange(0, BT)
    b_dg = tl.sum(tl.where(o_i[None, :] >= o_i[:, None], b_dG[None, :], 0.0), 1)
    tl.store(dg + o_gate, b_dg.to(dg.dtype.element_ty), mask=m_t)
    tl.store(dbeta + o_gate, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)


def chunk_wy_fwd(k, v, g, beta, layout, store_a_inv: bool, a_inv=None, write_w: bool = True,
                 write_u: bool = True, settings=DEFAULT_LAUNCH):
    """Returns G [tokens, H] (cumsum of g within chunks), Ainv [tokens, H, BT] in state_dtype (lower blocks; None
    unless store_a_inv or given), W [tokens, H, K] and U~ [tokens, H, V] in k's dtype (each None unless asked
    for: backward needs only W, a state pass that applies Ainv itself neither). A given a_inv (the forward's,
    in backward) is used instead of solving again. With store_a_inv, one launch solves for Ainv and stores it
    and a second applies it, as backward does: the one kernel doing both runs at 1 warp (16-row dots, 255
    registers), the apply alone at 4."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    g_cum = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    w = torch.empty(B, T, H, K, device=k.device, dtype=k.dtype) if write_w else None
    u = torch.empty(B, T, H, V, device=k.device, dtype=k.dtype) if write_u else None

    def run(name, **flags):
        chunk_wy_fwd_kernel[(layout.num_chunks, H)](
            k, v, g, beta, g_cum, a_inv, w, u, layout.cu_seqlens, layout.chunk_indices, H=H, K=K, V=V,
            BT=CHUNK_SIZE, BS=CHUNK_SIZE // 4, BK=block_size(K, 64), BV=block_size(V, 64), **flags,
            **settings.launch(name, k.dtype))

    if store_a_inv and a_inv is None:
        a_inv = torch.empty(B, T, H, CHUNK_SIZE, device=k.device, dtype=state_dtype(k.dtype))
        run("wy_solve", STORE_AINV=True, LOAD_AINV=False, WRITE_W=False, WRITE_U=False)
    if a_inv is not None and (write_w or write_u):
        run("wy_recompute", STORE_AINV=False, LOAD_AINV=True, WRITE_W=write_w, WRITE_U=write_u)
    elif a_inv is None:
        run("wy_fwd", STORE_AINV=False, LOAD_AINV=False, WRITE_W=write_w, WRITE_U=write_u)
    return g_cum, a_inv, w, u


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the stored chunk states h and of the stored Ainv: float16 for 16-bit inputs, else float32. h is
    forward_state_mma's operand as stored; every product takes Ainv as a 16-bit dot operand anyway, and float16's
    11 mantissa bits keep the one more rounding small (bf16 storage missed the check's dh0 bound)."""
    return torch.float32 if dtype == torch.float32 else torch.float16


def run_state_fwd(k, v, w, u, a_inv, beta, g_cum, initial_state, output_final_state, layout, q=None, scale=1.0,
                  out_dtype=None, settings=DEFAULT_LAUNCH):
    """Launches chunk_state_fwd_kernel; returns (o, h, U, final state), the ones not asked for None.
    W and U~ come from w and u, or (w None) the pass applies a_inv (with beta) to K and V itself; with w and
    a_inv both None it is scalar-decay linear attention's pass (no delta rule: U = u, returned as it is).
    With out_dtype (and q, scale) it writes o [tokens, H, V] in out_dtype; else the chunk-start states h
    [NT, H, K, V] in state_dtype and U [tokens, H, V] in k's dtype. The final state is float32
    (output_final_state) or None."""
    output, delta = out_dtype is not None, w is not None or a_inv is not None
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = len(layout.cu_seqlens) - 1
    o = torch.empty_like(v, dtype=out_dtype) if output else None
    h = None if output else torch.empty(layout.num_chunks, H, K, V, device=k.device, dtype=state_dtype(k.dtype))
    v_new = None if output or not delta else torch.empty_like(v, dtype=k.dtype)
    final_state = torch.empty(N, H, K, V, device=k.device, dtype=torch.float32) if output_final_state else None
    BV, config = settings.state_pass_config("state_fwd", N * H, K, V, k.dtype, k.device)
    chunk_state_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, w, u, a_inv, beta, g_cum, h, v_new, o, initial_state, final_state, scale,
        layout.cu_seqlens, layout.chunk_offsets, H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, 256), BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state, OUTPUT=output,
        APPLY_AINV=delta and w is None, DELTA=delta, **config)
    return o, h, v_new if delta else u, final_state


def chunk_output_fwd(q, k, v_new, g_cum, h, scale, layout, out_dtype, settings=DEFAULT_LAUNCH):
    B, T, H, K = q.shape
    V = v_new.shape[-1]
    o = torch.empty(B, T, H, V, device=q.device, dtype=out_dtype)
    config = settings.output_config(V, q.dtype)
    chunk_output_fwd_kernel[(triton.cdiv(V, config["BV"]), layout.num_chunks, H)](
        q, k, v_new, g_cum, h, o, scale, layout.cu_seqlens, layout.chunk_indices,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, 64), **config)
    return o


def chunk_state_output_fwd(q, k, v, w, u, a_inv, beta, g_cum, scale, initial_state, output_final_state, layout,
                           out_dtype, keep_states: bool, settings=DEFAULT_LAUNCH):
    """The forward's state pass and output: returns o [tokens, H, V] in out_dtype, the final state (float32, or
    None) and, with keep_states (training), the chunk-start states h [NT, H, K, V] (state_dtype) and U
    [tokens, H, V] (k's dtype) for backward (else None, None). Where inference's state pass writes O itself
    (float32 in wide blocks, forward_writes_output) no states are stored; else the output kernel reads them."""
    num_states, K, V = (len(layout.cu_seqlens) - 1) * k.shape[2], k.shape[3], v.shape[3]
    if not keep_states and settings.forward_writes_output(num_states, K, V, k.dtype, k.device):
        o, _, _, final_state = run_state_fwd(k, v, w, u, a_inv, beta, g_cum, initial_state, output_final_state,
                                             layout, q=q, scale=scale, out_dtype=out_dtype, settings=settings)
        return o, final_state, None, None
    _, h, v_new, final_state = run_state_fwd(k, v, w, u, a_inv, beta, g_cum, initial_state, output_final_state,
                                             layout, settings=settings)
    o = chunk_output_fwd(q, k, v_new, g_cum, h, scale, layout, out_dtype, settings)
    return (o, final_state, h, v_new) if keep_states else (o, final_state, None, None)


def chunk_state_bwd(q, k, w, g_cum, do, dht, scale, has_initial_state, layout, settings=DEFAULT_LAUNCH):
    """Returns dh [NT, H, K, V] (gradient of each chunk's end state) and dU [tokens, H, V] in q's dtype, and
    dh0 (float32, or None). w None: scalar-decay linear attention (no delta rule)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    N = len(layout.cu_seqlens) - 1
    dh = torch.empty(layout.num_chunks, H, K, V, device=q.device, dtype=q.dtype)
    du = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    dh0 = torch.empty(N, H, K, V, device=q.device, dtype=torch.float32) if has_initial_state else None
    BV, config = settings.state_pass_config("state_bwd", N * H, K, V, q.dtype, q.device)
    chunk_state_bwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, w, g_cum, do, dht, dh, du, dh0, scale, layout.cu_seqlens, layout.chunk_offsets,
        H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, 256), BV=BV, USE_INITIAL_STATE=has_initial_state,
        USE_FINAL_STATE_GRADIENT=dht is not None, DELTA=w is not None, **config)
    return dh, du, dh0


def chunk_dqk_bwd(q, k, v_new, g_cum, h, do, dh, du, scale, layout, settings=DEFAULT_LAUNCH, delta=True):
    """Returns dq, the output/state part of dk, dW (all three in q's dtype; dW None without delta, gated linear
    attention, whose dk this part is all of) and the per-K-block dG parts [NK, tokens, H] (float32)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    config = settings.dqk_config(K, V, q.dtype)
    NK = triton.cdiv(K, config["BK"])
    dq, dk_part, dw = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q) if delta else None
    dG_part = torch.empty(NK, B, T, H, device=q.device, dtype=torch.float32)
    chunk_dqk_bwd_kernel[(NK, layout.num_chunks, H)](
        q, k, v_new, g_cum, h, do, dh, du, dq, dk_part, dw, dG_part, scale, layout.cu_seqlens,
        layout.chunk_indices, B * T, H=H, K=K, V=V, BT=CHUNK_SIZE, DELTA=delta, **config)
    return dq, dk_part, dw, dG_part


def chunk_wy_bwd(k, v, g, beta, g_cum, a_inv, dw, du, dk_part, dG_part, layout, settings=DEFAULT_LAUNCH):
    """Returns dk, dv, dg, dbeta in the dtypes of k, v, g, beta."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    dk, dv, dg, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(g), torch.empty_like(beta)
    chunk_wy_bwd_kernel[(layout.num_chunks, H)](
        k, v, beta, g_cum, a_inv, dw, du, dk_part, dG_part, dk, dv, dbeta, dg, layout.cu_seqlens,
        layout.chunk_indices, B * T, H=H, K=K, V=V, BT=CHUNK_SIZE, BK=block_size(K, 64), BV=block_size(V, 64),
        NK_PARTS=dG_part.shape[0], **settings.launch("wy_bwd", k.dtype))
    return dk, dv, dg, dbeta


# Each intermediate is dropped right after the last kernel that reads it, so that the peak memory is what one
# step needs, not everything at once (the caching allocator reuses the blocks in stream order).
def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, layout, for_backward,
                               settings=DEFAULT_LAUNCH):
    """Returns o, the final state (or None) and, with for_backward, what backward keeps: Ainv, the chunk-start
    states h and U (else None, None, None)."""
    num_states, K, V = (len(layout.cu_seqlens) - 1) * k.shape[2], k.shape[3], v.shape[3]
    apply = settings.applies_a_inv(num_states, K, V, k.dtype, k.device)
    g_cum, a_inv, w, u = chunk_wy_fwd(k, v, g, beta, layout, store_a_inv=for_backward or apply,
                                      write_w=not apply, write_u=not apply, settings=settings)
    o, final_state, h, v_new = chunk_state_output_fwd(q, k, v, w, u, a_inv, beta, g_cum, scale, initial_state,
                                                      output_final_state, layout, v.dtype, keep_states=for_backward,
                                                      settings=settings)
    return o, final_state, a_inv if for_backward else None, h, v_new


def chunk_gated_delta_rule_bwd(q, k, v, g, beta, a_inv, h, v_new, scale, has_initial_state, do, dht, layout,
                               settings=DEFAULT_LAUNCH):
    g_cum, _, w, _ = chunk_wy_fwd(k, v, g, beta, layout, store_a_inv=False, a_inv=a_inv, write_u=False,
                                  settings=settings)
    dh, du, dh0 = chunk_state_bwd(q, k, w, g_cum, do, dht, scale, has_initial_state, layout, settings)
    del w
    dq, dk_part, dw, dG_part = chunk_dqk_bwd(q, k, v_new, g_cum, h, do, dh, du, scale, layout, settings)
    del dh  # h and U stay with the autograd context until backward returns
    dk, dv, dg, dbeta = chunk_wy_bwd(k, v, g, beta, g_cum, a_inv, dw, du, dk_part, dG_part, layout, settings)
    return dq, dk, dv, dg, dbeta, dh0


class ChunkFunction(torch.autograd.Function):
    """The chunk form's autograd function, with and without the delta rule: `fwd` is chunk_gated_delta_rule_fwd
    (or `chunk_gla.chunk_gla_fwd_all`) and returns o, the final state and three tensors backward keeps (Ainv or
    G, the chunk-start states h and U: the state pass's outputs, which backward would otherwise recompute with a
    second state pass); `bwd` (chunk_gated_delta_rule_bwd, `chunk_gla.chunk_gla_bwd_all`) takes them back."""

    @staticmethod
    def forward(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, for_backward, settings,
                fwd, bwd):
        """(o, final_state, then what else backward keeps: `fwd`'s three tensors and the layout's)."""
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        initial_state = None if initial_state is None else initial_state.float().contiguous()
        layout = sequence_layout(q.shape[0], q.shape[1], cu_seqlens, CHUNK_SIZE, q.device)
        o, final_state, *kept = fwd(q, k, v, g, beta, scale, initial_state, output_final_state, layout, for_backward,
                                    settings)
        return o, final_state, *kept, *layout[:3]

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, g, beta, ctx.scale, initial_state, _, _, _, ctx.settings, _, ctx.bwd = inputs
        ctx.save_for_backward(q, k, v, g, beta, *output[2:])
        ctx.has_initial_state = initial_state is not None
        ctx.mark_non_differentiable(*(x for x in output[2:] if x is not None))

    @staticmethod
    def vmap(info, in_dims, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, for_backward,
             settings, fwd, bwd):
        """A pack's models are one launch over all their sequences (packed sequences, cu_seqlens, are not
        packed models: one launch per model then)."""
        # asked again here: under vmap, run_chunk saw wrappers that do not say whether they require grad
        for_backward = needs_backward(q, k, v, g, beta, initial_state)
        args = (q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, for_backward, settings, fwd,
                bwd)
        if cu_seqlens is not None:
            return loop_models(ChunkFunction.apply, info, in_dims, args)
        return fold_models(ChunkFunction.apply, info, in_dims, args, per_sequence=(0, 1, 2, 3, 4, 6), num_outputs=2)

    @staticmethod
    def backward(ctx, do, dht, *_):
        q, k, v, g, beta, *kept, cu_seqlens, chunk_indices, chunk_offsets = ctx.saved_tensors
        inputs_and_kept = (*(x.contiguous() for x in (q, k, v, g, beta)), *kept)
        layout = SequenceLayout(cu_seqlens, chunk_indices, chunk_offsets, len(chunk_indices))
        dht = None if dht is None else dht.float().contiguous()
        dq, dk, dv, dg, dbeta, dh0 = ctx.bwd(*inputs_and_kept, ctx.scale, ctx.has_initial_state, do.contiguous(),
                                              dht, layout, ctx.settings)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None, None, None, None


def needs_backward(*inputs) -> bool:
    """Whether autograd will call backward on these inputs (asked before forward, which runs in no-grad mode)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)


def run_chunk(fwd, bwd, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, settings):
    """ChunkFunction with fwd and bwd; whether backward can run is asked here, since inside forward autograd has
    already turned grad mode off."""
    for_backward = needs_backward(q, k, v, g, beta, initial_state)
    return ChunkFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, for_backward,
                               settings, fwd, bwd)[:2]


def triton_chunk_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None, output_final_state=False,
                                  cu_seqlens=None, settings=DEFAULT_LAUNCH):
    """Chunkwise gated delta rule (chunk size 64) in Triton, differentiable in every input.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay, <= 0), beta: [B, T, H]. float32, bfloat16 or float16.
        scale: multiplies q.
        initial_state: [N, H, K, V] float32 (N = B, or len(cu_seqlens) - 1 with B = 1), or None for zeros.
        output_final_state: also return the state after the last token.
        cu_seqlens: LongTensor [N + 1] of packed-sequence boundaries (B = 1), or None.
        settings: the kernels' launch settings (`launch.ChunkLaunch`).
    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [N, H, K, V] float32, or None.
    """
    return run_chunk(chunk_gated_delta_rule_fwd, chunk_gated_delta_rule_bwd, q, k, v, g, beta, scale, initial_state,
                     output_final_state, cu_seqlens, settings)
