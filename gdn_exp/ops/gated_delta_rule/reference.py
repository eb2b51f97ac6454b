"""PyTorch forms of the gated delta rule: the token-by-token oracle and the chunkwise (UT/WY) form.

Per head, with state S of shape [K, V], for t = 1..T:

    S <- exp(g_t) * S
    u_t = beta_t * (v_t - S^T k_t)          (use_delta=False: u_t = beta_t * v_t, scalar-decay linear attention)
    S <- S + k_t u_t^T
    o_t = S^T (scale * q_t)

Both functions take the arguments of `gdn_exp.ops.gated_delta_rule` (minus mode/backend) and are
differentiable through autograd. They compute in float64 for float64 inputs, else in float32. The oracle also
takes a decay per key channel, g [B, T, H, K] (S <- exp(g_t)[:, None] * S: GLA's gate), whose chunkwise form
without the delta rule is `chunk_channel_gated_linear_attention`.
"""
import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _split_varlen(fn, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, **kw):
    """Runs `fn` on each packed sequence of a B = 1 batch; concatenates outputs, stacks states."""
    outs, states = [], []
    bounds = cu_seqlens.tolist()
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        sl = slice(start, end)
        o, s = fn(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale=scale, initial_state=h0,
                  output_final_state=output_final_state, **kw)
        outs.append(o)
        states.append(s)
    final = torch.cat(states) if output_final_state else None
    return torch.cat(outs, dim=1), final


def recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_delta=True):
    """Token-by-token oracle.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay, <= 0): [B, T, H], or [B, T, H, K] for a decay per
            key channel; beta: [B, T, H].
        scale: multiplies q; defaults to K ** -0.5.
        initial_state: [N, H, K, V] (N = B, or len(cu_seqlens) - 1 with B = 1), or None for zeros.
        output_final_state: also return the state after the last token, [N, H, K, V].
        cu_seqlens: LongTensor [N + 1] of packed-sequence boundaries (B must be 1), or None.
        use_delta: False turns the delta rule into linear attention with a decay (the no_delta ablation).
    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [N, H, K, V] in the compute dtype, or None.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        return _split_varlen(recurrent_gated_delta_rule, q, k, v, g, beta, scale, initial_state,
                             output_final_state, cu_seqlens, use_delta=use_delta)
    out_dtype, dt = v.dtype, _compute_dtype(v)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        decay = g[:, t].exp()                                                 # [B, H] or [B, H, K]
        S = S * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])   # [B, H, K, V]
        u = v[:, t] if not use_delta else v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        u = beta[:, t, :, None] * u                                           # [B, H, V]
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def _chunks(x, C: int, N: int, dt) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...] in dtype dt, zero-padded to N * C tokens (g = 0, beta = 0: the padding
    leaves the state as it was)."""
    pad = N * C - x.shape[1]
    x = torch.nn.functional.pad(x.to(dt), (0, 0) * (x.dim() - 3) + (0, 0, 0, pad)) if pad else x.to(dt)
    return x.reshape(x.shape[0], N, C, *x.shape[2:]).movedim(3, 1)


def chunk_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_delta=True, chunk_size=64):
    """Chunkwise form: the algorithm of the Triton chunk kernels, in PyTorch (what runs on CPU).

    Within a chunk of C tokens with local gate cumsum G and chunk-start state S0, the delta-rule
    updates U solve the unit-lower-triangular system (I + A) U = beta * (V - exp(G) K S0), where
    A[t, j] = beta_t exp(G_t - G_j) k_t.k_j for j < t. So U = U~ - W S0 with U~ = T (beta V),
    W = T (beta exp(G) K), T = (I + A)^-1 (the UT/WY transform), computed for all chunks at once;
    only the state pass S0 -> S_C is sequential.

    Same arguments and returns as `recurrent_gated_delta_rule`, plus chunk_size.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        return _split_varlen(chunk_gated_delta_rule, q, k, v, g, beta, scale, initial_state,
                             output_final_state, cu_seqlens, use_delta=use_delta, chunk_size=chunk_size)
    out_dtype, dt = v.dtype, _compute_dtype(v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, max(T, 1))  # a short sequence is one chunk: no padding to a full chunk
    N = (T + C - 1) // C
    q, k, v, g, beta = (_chunks(x, C, N, dt) for x in (q, k, v, g, beta))     # [B, H, N, C, ...]
    q = q * scale
    G = g.cumsum(-1)                                                           # [B, H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, N, C, C]
    if use_delta:
        A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
        eye = torch.eye(C, dtype=dt, device=q.device)
        rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], dim=-1)
        TU = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        U_tilde, W = TU.split([V, K], dim=-1)                                  # [B, H, N, C, V], [.., K]
    else:
        U_tilde, W = beta[..., None] * v, None
    qk = (q @ k.transpose(-1, -2)) * decay                                     # [B, H, N, C, C]
    carries_state = N > 1 or initial_state is not None  # else one chunk from a zero state: o = qk u only
    q_decayed = q * G.exp()[..., None] if carries_state else None
    k_to_end = k * (G[..., -1:] - G).exp()[..., None] if carries_state or output_final_state else None  # to chunk end

    S = None if initial_state is None else initial_state.to(dt)  # None: a zero state (its terms are skipped)
    outs = []
    for n in range(N):
        u = U_tilde[:, :, n] if W is None or S is None else U_tilde[:, :, n] - W[:, :, n] @ S  # [B, H, C, V]
        outs.append(qk[:, :, n] @ u if S is None else q_decayed[:, :, n] @ S + qk[:, :, n] @ u)
        if n < N - 1 or output_final_state:
            S_in = k_to_end[:, :, n].transpose(-1, -2) @ u
            S = S_in if S is None else S * G[:, :, n, -1].exp()[..., None, None] + S_in
    o = torch.stack(outs, dim=2).movedim(1, 3).reshape(B, N * C, H, V)[:, :T]  # [B, T, H, V]
    return o.to(out_dtype), (S if output_final_state else None)


def chunk_channel_gated_linear_attention(q, k, v, g, beta, *, scale=None, initial_state=None,
                                         output_final_state=False, cu_seqlens=None, chunk_size=16):
    """Chunkwise linear attention with a decay per key channel (GLA's update), per head:

        S <- exp(g_t)[:, None] * S + k_t (beta_t v_t)^T;  o_t = S^T (scale q_t)        g_t [K], S [K, V]

    Within a chunk with local cumsum G [C, K] and chunk-start state S0: o_t = (q_t exp(G_t)) S0 +
    sum_{s <= t} (sum_k q_t[k] k_s[k] exp(G_t[k] - G_s[k])) beta_s v_s. The pairwise decays are kept as a
    [C, C, K] tensor of exponents <= 0, never as exp(G) and exp(-G) factors, which overflow once a chunk's decay
    passes e^-88; so memory grows as T C K per head, and chunks are short.

    Same arguments and returns as `recurrent_gated_delta_rule` with g [B, T, H, K], plus chunk_size.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        return _split_varlen(chunk_channel_gated_linear_attention, q, k, v, g, beta, scale, initial_state,
                             output_final_state, cu_seqlens, chunk_size=chunk_size)
    out_dtype, dt = v.dtype, _compute_dtype(v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, max(T, 1))
    N = (T + C - 1) // C
    q, k, v, g, beta = (_chunks(x, C, N, dt) for x in (q, k, v, g, beta))     # [B, H, N, C, ...]
    q = q * scale
    u = beta[..., None] * v                                                    # [B, H, N, C, V]
    G = g.cumsum(-2)                                                           # [B, H, N, C, K]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()[..., None]
    decay = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal, float("-inf")).exp()  # [.., C, C, K]
    qk = torch.einsum("...tk,...sk,...tsk->...ts", q, k, decay)                # [B, H, N, C, C]
    q_decayed = q * G.exp()                                                    # to the chunk's start
    k_to_end = k * (G[..., -1:, :] - G).exp()                                  # to the chunk's end
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    outs = []
    for n in range(N):
        outs.append(q_decayed[:, :, n] @ S + qk[:, :, n] @ u[:, :, n])         # [B, H, C, V]
        S = S * G[:, :, n, -1].exp()[..., None] + k_to_end[:, :, n].transpose(-1, -2) @ u[:, :, n]
    o = torch.stack(outs, dim=2).movedim(1, 3).reshape(B, N * C, H, V)[:, :T]  # [B, T, H, V]
    return o.to(out_dtype), (S if output_final_state else None)
