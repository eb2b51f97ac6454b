"""The Gated DeltaNet token mixer (Yang, Kautz & Hatamizadeh, 2024) with a switch for each component."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from gdn_exp.ops import (BACKENDS, MODES, decode_step, gated_delta_rule, gated_linear_attention, gated_rms_norm,
                         resolve_backend, short_conv_silu)

from .conv import ShortConvolution, positions_in_sequence


DECAYS = ("head", "channel")
GLA_GATE_RANK, GLA_GATE_NORMALIZER = 16, 16  # GLA's gate: alpha = sigmoid(x W1 W2 + b) ** (1 / 16), W1 W2 of rank 16


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet layer: x [B, T, d_model] -> y [B, T, d_model].

    With H = num_heads, K = head_dim, V = head_dim * expand_v, per token:

        q, k, v = silu(conv(x W_q)), silu(conv(x W_k)), silu(conv(x W_v))     heads [H, K], [H, K], [H, V]
        q, k    = q / |q|, k / |k|                                             per head
        g       = -exp(A_log) * softplus(x W_a + dt_bias)                      log decay per head, <= 0
                  (decay="channel": logsigmoid(x W_a1 W_a2 + b) / 16, per key channel [H, K], as GLA)
        beta    = sigmoid(x W_b)   (2 * sigmoid(x W_b) with allow_neg_eigval)  per head
        o       = gated_delta_rule(q, k, v, g, beta)                           [H, V]
        y       = (RMSNorm(o) * silu(x W_g)) W_o                               RMSNorm over V, shared by heads

    Switches (each off state is an ablation; defaults give the full model):
        use_short_conv=False: no convolution; q, k, v still pass through SiLU, so only the conv is removed.
        use_qk_l2norm=False:  q and k are not normalised.
        use_gate=False:       g = 0 (no decay, i.e. DeltaNet); no W_a, A_log, dt_bias.
        use_delta=False:      scalar-decay linear attention, S <- exp(g) S + k (beta v)^T, one decay per head
                              (Mamba2-like, not GLA's per-channel gate; `ops.gated_linear_attention`).
        use_beta=False:       beta = 1; no W_b.
        decay="channel":      with use_delta=False, GLA's gate (Yang et al. 2023): a decay per key channel from a
                              rank-16 projection; PyTorch only (`ops.gated_linear_attention` with g [B, T, H, K]).
        allow_neg_eigval:     beta in [0, 2], so the transition I - beta k k^T may have negative eigenvalues.
        use_output_gate=False: y = RMSNorm(o) W_o; no W_g.

    Parameter budget, with d = d_model and W = conv_size:
        W_q, W_k, W_v (one fused qkv_proj)  d (2HK + HV)
        short conv                          W (2HK + HV)        use_short_conv
        W_a, A_log, dt_bias                 d H + 2 H           use_gate (decay="channel": 16 d + 16 HK + HK)
        W_b                                 d H                 use_beta
        W_g                                 d HV                use_output_gate
        RMSNorm, W_o                        V + HV d
    With HK = HV = d that is about 5 d^2 (6 d^2 for the paper's HK = 0.75 d, HV = 1.5 d).

    A_log and dt_bias follow Mamba2's init: A ~ U(1, 16), dt log-uniform in [1e-3, 0.1] and
    dt_bias = softplus^-1(dt); they are listed in `no_weight_decay_params`. Linear layers keep torch's
    default init here; LanguageModel re-initialises them.

    Args:
        mode: "chunk" or "recurrent" form of the op for T > 1. A T = 1 step always runs "recurrent",
            which is the same computation as a one-token chunk without padding it to the chunk size.
        backend: the ops' backend ("auto", "triton", "torch"): the short conv with SiLU and q/k norms
            (`ops.short_conv_silu`), the op (`ops.gated_delta_rule`, or without the delta rule
            `ops.gated_linear_attention`) and the output's RMSNorm and gate (`ops.gated_rms_norm`).
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, expand_v: float = 1.0, conv_size: int = 4,
                 use_short_conv: bool = True, use_output_gate: bool = True, use_qk_l2norm: bool = True,
                 use_gate: bool = True, use_delta: bool = True, use_beta: bool = True,
                 allow_neg_eigval: bool = False, decay: str = "head", norm_eps: float = 1e-6, mode: str = "chunk",
                 backend: str = "auto"):
        super().__init__()
        value_dim = int(head_dim * expand_v)
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"GatedDeltaNet needs num_heads >= 1 and head_dim >= 1; got {num_heads}, {head_dim}")
        if value_dim < 1 or value_dim != head_dim * expand_v:
            raise ValueError(f"head_dim * expand_v = {head_dim} * {expand_v} must be a positive integer")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        if decay not in DECAYS:
            raise ValueError(f"decay={decay!r} is not one of {DECAYS}")
        if decay == "channel" and (use_delta or not use_gate):
            raise ValueError("decay='channel' needs use_gate=True and use_delta=False (GLA's update; the delta rule "
                             "takes one decay per head)")
        self.set_mode(mode)
        self.num_heads, self.head_dim, self.value_dim = num_heads, head_dim, value_dim
        self.use_short_conv, self.use_qk_l2norm = use_short_conv, use_qk_l2norm
        self.use_gate, self.use_delta, self.use_beta = use_gate, use_delta, use_beta
        self.allow_neg_eigval, self.use_output_gate, self.decay = allow_neg_eigval, use_output_gate, decay
        self.backend = backend

        qkv_dim = num_heads * (2 * head_dim + value_dim)
        self.qkv_proj = nn.Linear(d_model, qkv_dim, bias=False)
        if use_short_conv:
            self.conv = ShortConvolution(qkv_dim, conv_size)
        if decay == "channel":  # GLA's low-rank gate projection, its bias the gate's offset
            self.a_proj = nn.Sequential(nn.Linear(d_model, GLA_GATE_RANK, bias=False),
                                        nn.Linear(GLA_GATE_RANK, num_heads * head_dim, bias=True))
        elif use_gate:
            self.a_proj = nn.Linear(d_model, num_heads, bias=False)
            A = torch.empty(num_heads).uniform_(1, 16)
            self.A_log = nn.Parameter(A.log())
            dt = torch.empty(num_heads).uniform_(math.log(1e-3), math.log(0.1)).exp()
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))    # softplus(dt_bias) = dt
        self.no_weight_decay_params = ("A_log", "dt_bias") if use_gate and decay == "head" else ()
        if use_beta:
            self.b_proj = nn.Linear(d_model, num_heads, bias=False)
        if use_output_gate:
            self.g_proj = nn.Linear(d_model, num_heads * value_dim, bias=False)
        self.o_norm = nn.RMSNorm(value_dim, eps=norm_eps)
        self.o_proj = nn.Linear(num_heads * value_dim, d_model, bias=False)
        self.record = None  # for analysis, gdn_exp.analyze: called with the op's inputs

    def set_mode(self, mode: str) -> None:
        """Chooses the op's form for T > 1: "chunk" or "recurrent"."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        self.mode = mode

    def is_decode_step(self, x, cache, use_cache) -> bool:
        """One token with a cache, no autograd, on the Triton backend: the in-place decode kernel applies."""
        return (x.shape[1] == 1 and cache is not None and use_cache and not torch.is_grad_enabled()
                and resolve_backend(self.backend, x.device) == "triton")

    def forward(self, x, *, cu_seqlens=None, cache=None, use_cache=False):
        """
        Args:
            x: [B, T, d_model].
            cu_seqlens: LongTensor [N + 1] of packed-sequence boundaries (B = 1); nothing crosses a boundary.
            cache: state after the preceding tokens, {"conv": [B, W-1, 2HK + HV] or None,
                "recurrent": [B, H, K, V] float32}, or None to start from zeros.
            use_cache: also return the state after x, in the same form.
        Returns:
            y: [B, T, d_model]; the new cache or None.
        """
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_dim, self.value_dim
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("GatedDeltaNet: cu_seqlens cannot be combined with a cache")
        qkv = self.qkv_proj(x)                                                 # [B, T, H(2K + V)]
        position = None if cu_seqlens is None or not self.use_short_conv else positions_in_sequence(cu_seqlens, T)
        norm = self.use_qk_l2norm
        (q, k, v), conv_cache = short_conv_silu(                               # [B, T, H, K] x 2, [B, T, H, V]
            qkv, self.conv.weight if self.use_short_conv else None, ((H, K, norm), (H, K, norm), (H, V, False)),
            position=position, cache=None if cache is None else cache["conv"], use_cache=use_cache,
            backend=self.backend)
        if self.decay == "channel":  # float32: logsigmoid autocasts to float32
            g = F.logsigmoid(self.a_proj(x)).view(B, T, H, K) / GLA_GATE_NORMALIZER     # [B, T, H, K]
        elif self.use_gate:  # float32 under autocast: the parameters are float32
            g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)  # [B, T, H]
        else:
            g = q.new_zeros(B, T, H)
        beta = self.b_proj(x).sigmoid() if self.use_beta else q.new_ones(B, T, H)
        if self.allow_neg_eigval:
            beta = 2 * beta
        if self.record is not None:  # for analysis, gdn_exp.analyze
            self.record({"q": q, "k": k, "v": v, "g": g, "beta": beta, "scale": K ** -0.5})

        op_args = dict(initial_state=None if cache is None else cache["recurrent"], output_final_state=use_cache,
                       cu_seqlens=cu_seqlens, mode="recurrent" if T == 1 else self.mode)
        if self.use_delta and self.is_decode_step(x, cache, use_cache):
            # generation: the fused kernel updates the cached state in place, no new [B, H, K, V] per token
            recurrent_state = cache["recurrent"].contiguous()
            o = decode_step(q, k, v, g, beta, recurrent_state, scale=K ** -0.5)
        elif self.use_delta:
            o, recurrent_state = gated_delta_rule(q, k, v, g, beta, backend=self.backend, **op_args)
        else:
            o, recurrent_state = gated_linear_attention(q, k, v, g, beta, backend=self.backend, **op_args)

        gate = self.g_proj(x).view(B, T, H, V) if self.use_output_gate else None
        o = gated_rms_norm(o, self.o_norm.weight, gate, eps=self.o_norm.eps, backend=self.backend)  # [B, T, H, V]
        y = self.o_proj(o.reshape(B, T, H * V))
        return y, ({"conv": conv_cache, "recurrent": recurrent_state} if use_cache else None)
