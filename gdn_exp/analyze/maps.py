"""What a mixer layer does from token to token, computed exactly in float64 from the inputs its op received.

Gated DeltaNet, per head with state S [K, V] and α_t = exp(g_t) (the op's recurrence, `gdn_exp.ops.gated_delta_rule`):

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ (scale q_t)

Unrolled, o_t = Σ_{s≤t} A[t, s] v_s with the implicit attention

    A[t, s] = scale q_tᵀ (Π_{r=s+1..t} α_r (I − β_r k_r k_rᵀ)) β_s k_s      (later r on the left)

the weight with which token s's value reaches token t's output. Without the delta rule (ablation no_delta,
S_t = α_t S_{t−1} + β_t k_t v_tᵀ) the product is a number: A[t, s] = scale (q_t·k_s) β_s Π_{r=s+1..t} α_r, and
without the gate as well (α = 1) it is plain linear attention. An attention layer's map is its softmax itself.

Packed documents (task=lm with varlen): `sequence_ids` [B, T] numbers the documents; nothing crosses a boundary.
"""
from typing import Iterator, Optional

import torch

from gdn_exp.nn.attention import attention_mask


def same_sequence(sequence_ids: Optional[torch.Tensor], T: int, device) -> torch.Tensor:
    """BoolTensor [B, 1, T, T] (True: t and s are in the same document), or [1, 1, T, T] of True without ids."""
    if sequence_ids is None:
        return torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
    return (sequence_ids[:, :, None] == sequence_ids[:, None, :])[:, None]


def implicit_attention(q, k, g, beta, *, scale: float, use_delta: bool = True, sequence_ids=None) -> torch.Tensor:
    """The implicit attention A [B, H, T, T] (float64, zero above the diagonal) of a Gated DeltaNet layer.

    Args:
        q, k: [B, T, H, K]; g (log decay), beta: [B, T, H]: the op's inputs, as the layer passed them.
        scale: the op's scale (the layer's K ** -0.5).
        use_delta: False for the no_delta ablation (scalar-decay linear attention).
        sequence_ids: LongTensor [B, T] of document numbers for packed documents, or None.
    Cost: T steps of O(B H K T) with the delta rule; memory B H T² floats.
    """
    q, k, g, beta = (x.to(torch.float64).transpose(1, 2) for x in (q, k, g, beta))   # [B, H, T, (K)]
    B, H, T, K = q.shape
    if use_delta:
        A = q.new_zeros(B, H, T, T)
        carried = q.new_zeros(B, H, K, T)  # column s < t: Π_{r=s+1..t} α_r (I − β_r k_r k_rᵀ) β_s k_s
        for t in range(T):
            k_t = k[:, :, t, :, None]                                          # [B, H, K, 1]
            previous = carried[..., :t]
            erased = beta[:, :, t, None, None] * k_t * (k_t.transpose(-1, -2) @ previous)
            carried[..., :t] = g[:, :, t, None, None].exp() * (previous - erased)
            carried[..., t] = beta[:, :, t, None] * k[:, :, t]
            A[:, :, t] = scale * (q[:, :, t, None, :] @ carried)[:, :, 0]
    else:
        G = g.cumsum(-1)                                                       # [B, H, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        # Π_{r=s+1..t} α_r = exp(G_t − G_s), masked before exp: above the diagonal it would overflow
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        A = scale * (q @ k.transpose(-1, -2)) * decay * beta[..., None, :]
    return A * same_sequence(sequence_ids, T, q.device)


def softmax_attention(q, k, *, scale: float, window: Optional[int] = None, sequence_ids=None) -> torch.Tensor:
    """The attention map A [B, H, T, T] (float64, rows sum to 1) of a causal softmax attention layer.

    q, k: [B, T, H, D] after the rotary embedding; window: each query sees itself and the window − 1 keys
    before it (None: all of them), as in `gdn_exp.nn.Attention`; sequence_ids: as in `implicit_attention`.
    """
    q, k = (x.to(torch.float64).transpose(1, 2) for x in (q, k))              # [B, H, T, D]
    T = q.shape[2]
    positions = torch.arange(T, device=q.device)
    allowed = attention_mask(positions, positions, window) & same_sequence(sequence_ids, T, q.device)
    scores = (scale * q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1)


def apply_attention(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o_t = Σ_s A[t, s] v_s: A [B, H, T, T], v [B, T, H, V] -> [B, T, H, V] (float64)."""
    return torch.einsum("bhts,bshv->bthv", A, v.to(torch.float64))


def state_steps(k, v, g, beta, *, use_delta: bool = True, sequence_ids=None) -> Iterator[tuple]:
    """Runs the recurrence in float64 and yields, for t = 0..T−1, (decayed, erased, S):

        decayed = α_t S_{t−1}                  what the gate keeps of the previous state
        erased  = β_t k_t k_tᵀ α_t S_{t−1}     what the delta rule removes along k_t (zero without it)
        S       = S_t = decayed − erased + β_t k_t v_tᵀ

    each [B, H, K, V]. k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]; sequence_ids as in
    `implicit_attention` (the state restarts from zero at each document).
    """
    k, v, g, beta = (x.to(torch.float64) for x in (k, v, g, beta))
    B, T, H, K = k.shape
    S = k.new_zeros(B, H, K, v.shape[-1])
    for t in range(T):
        if sequence_ids is not None and t > 0:
            S = S * (sequence_ids[:, t] == sequence_ids[:, t - 1]).to(S.dtype)[:, None, None, None]
        k_t, v_t, beta_t = k[:, t, :, :, None], v[:, t, :, None, :], beta[:, t, :, None, None]
        decayed = g[:, t, :, None, None].exp() * S
        erased = beta_t * k_t * (k_t.transpose(-1, -2) @ decayed) if use_delta else torch.zeros_like(S)
        S = decayed - erased + beta_t * k_t * v_t
        yield decayed, erased, S


def gdn_states(k, v, g, beta, *, use_delta: bool = True, sequence_ids=None) -> torch.Tensor:
    """Every state S_t: [B, T, H, K, V] float64 (memory T·H·K·V floats per example; see `state_statistics` for
    long sequences). Arguments as in `state_steps`."""
    return torch.stack([S for _, _, S in state_steps(k, v, g, beta, use_delta=use_delta,
                                                     sequence_ids=sequence_ids)], dim=1)


def state_statistics(k, v, g, beta, *, use_delta: bool = True, sequence_ids=None) -> dict:
    """Per head and step, without keeping the states: {name: [B, T, H] float64}, with σ the singular values of S_t:

        norm            ‖S_t‖_F
        effective_rank  exp(entropy of σ / Σσ): 1 for a rank-one state, min(K, V) for a flat spectrum
        update          ‖S_t − α_t S_{t−1}‖_F / ‖α_t S_{t−1}‖_F: how much the step rewrites what the gate kept
        erased          ‖β_t k_t k_tᵀ α_t S_{t−1}‖_F / ‖α_t S_{t−1}‖_F: the share of it the delta rule removes
                        along k_t before writing (0 without the delta rule; at most β_t for a unit k_t)

    update and erased are NaN where α_t S_{t−1} = 0 (the first token of a sequence). Arguments as in `state_steps`.
    """
    rows = {name: [] for name in ("norm", "effective_rank", "update", "erased")}
    for decayed, erased, S in state_steps(k, v, g, beta, use_delta=use_delta, sequence_ids=sequence_ids):
        kept = torch.linalg.matrix_norm(decayed)                               # [B, H]
        kept = kept.masked_fill(kept == 0, float("nan"))
        sigma = torch.linalg.svdvals(S)                                        # [B, H, min(K, V)]
        p = sigma / sigma.sum(-1, keepdim=True)
        rows["norm"].append(torch.linalg.matrix_norm(S))
        rows["effective_rank"].append(torch.exp(-torch.xlogy(p, p).sum(-1)))
        rows["update"].append(torch.linalg.matrix_norm(S - decayed) / kept)
        rows["erased"].append(torch.linalg.matrix_norm(erased) / kept)
    return {name: torch.stack(values, dim=1) for name, values in rows.items()}
