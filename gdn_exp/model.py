"""The language model: token embedding, a stack of (mixer, SwiGLU) blocks, final norm and LM head.

    x = embed(input_ids)                                    (+ a learned position table, position_embedding=learned)
    for each layer:  x = x + mixer(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))     (no SwiGLU with mlp=false)
    logits = lm_head(RMSNorm(x))                                           (LayerNorm with norm=layernorm)

Each residual add runs in the norm after it (`AutocastRMSNorm`, one kernel on the Triton backend): the blocks pass
on (residual, delta), the stream x = residual + delta, and the next norm adds delta in.

The mixer of each layer is Gated DeltaNet or attention (`ModelConfig.layer_mixers`), which gives the GDN
model, the Transformer baseline and hybrids with (sliding-window) attention every n-th layer. The switches in
parentheses, with attention_bias, tie_embeddings and init_std, give Zoology's attention baseline (Figure 2 of
Arora et al. 2023; docs/results/mqar.md).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gdn_exp.nn import Attention, GatedDeltaNet, SwiGLU, swiglu_hidden_size
from gdn_exp.nn.conv import positions_in_sequence
from gdn_exp.nn.gated_deltanet import DECAYS
from gdn_exp.ops import add_rms_norm

MIXERS = ("gdn", "attention")
POSITION_EMBEDDINGS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
GDN_SWITCHES = ("use_short_conv", "use_output_gate", "use_qk_l2norm", "use_gate", "use_delta", "use_beta",
                "allow_neg_eigval", "decay")


@dataclass
class ModelConfig:
    """Architecture of a LanguageModel. Plain dataclass: the Hydra schema registers it as is."""

    name: str = "small"
    vocab_size: int = 32
    d_model: int = 128
    n_layers: int = 2
    num_heads: int = 2                        # Gated DeltaNet heads
    head_dim: int = 64                        # q/k head dim; v head dim = int(head_dim * expand_v)
    expand_v: float = 1.0
    mlp_ratio: float = 4.0                    # SwiGLU hidden = 2/3 * mlp_ratio * d_model, rounded up to 16
    mixer: str = "gdn"                        # "gdn" | "attention"
    attention_every: int = 0                  # hybrid: 0-based layer i is attention if (i + 1) % attention_every == 0
    attention_window: Optional[int] = None    # sliding window of the attention layers (None = full causal)
    attention_heads: Optional[int] = None     # heads of attention layers; None = max(1, d_model // 64)
    conv_size: int = 4
    use_short_conv: bool = True
    use_output_gate: bool = True
    use_qk_l2norm: bool = True
    use_gate: bool = True                     # False: no decay (g = 0), i.e. DeltaNet
    use_delta: bool = True                    # False: scalar-decay linear attention S <- a S + k (beta v)^T
    use_beta: bool = True                     # False: beta fixed at 1
    allow_neg_eigval: bool = False            # beta in [0, 2]
    decay: str = "head"                       # "head": one decay per head | "channel": per key channel (GLA), no delta
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    position_embedding: str = "rope"          # "rope": attention rotates q, k | "learned": a table added to embed
    max_positions: Optional[int] = None       # rows of the learned table: the longest sequence (e.g. ${task.seq_len})
    mlp: bool = True                          # False: no MLP sublayer, each block is its mixer alone (Zoology)
    norm: str = "rmsnorm"                     # "rmsnorm" | "layernorm" (with bias, as Zoology)
    attention_bias: bool = False              # biases in the attention projections (Zoology)
    tie_embeddings: bool = False
    init_std: Optional[float] = None          # None: Linear ~ N(0, 1/fan_in), embedding ~ N(0, 1); see LanguageModel

    def num_attention_heads(self) -> int:
        return self.attention_heads if self.attention_heads is not None else max(1, self.d_model // 64)

    def layer_mixers(self) -> list[str]:
        """The mixer of each layer, e.g. ["gdn", "gdn", "gdn", "attention"] for attention_every=4."""
        if self.mixer == "attention":
            return ["attention"] * self.n_layers
        every = self.attention_every
        return ["attention" if every > 0 and (i + 1) % every == 0 else "gdn" for i in range(self.n_layers)]

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent field."""
        for key in ("vocab_size", "d_model", "n_layers", "num_heads", "head_dim", "conv_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)} must be >= 1")
        for key in ("expand_v", "mlp_ratio", "norm_eps", "rope_theta", "init_std"):
            if key == "init_std" and self.init_std is None:
                continue
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key}={getattr(self, key)} must be > 0")
        if self.head_dim * self.expand_v != int(self.head_dim * self.expand_v):
            raise ValueError(f"model.expand_v={self.expand_v} times model.head_dim={self.head_dim} "
                             f"must be an integer (the value head dim)")
        if self.mixer not in MIXERS:
            raise ValueError(f"model.mixer={self.mixer!r} is not one of {MIXERS}")
        if self.attention_every < 0:
            raise ValueError(f"model.attention_every={self.attention_every} must be >= 0")
        if self.attention_every > 0 and self.mixer != "gdn":
            raise ValueError(f"model.attention_every={self.attention_every} makes hybrids of gdn layers; "
                             f"it needs model.mixer=gdn, got {self.mixer!r}")
        if self.attention_every > self.n_layers:
            raise ValueError(f"model.attention_every={self.attention_every} > model.n_layers={self.n_layers} "
                             f"leaves no attention layer")
        if self.mixer == "attention":  # no Gated DeltaNet layer: a changed GDN switch would be silently ignored
            defaults = ModelConfig()
            for key in GDN_SWITCHES:
                if getattr(self, key) != getattr(defaults, key):
                    raise ValueError(f"model.{key}={getattr(self, key)} has no effect with model.mixer=attention "
                                     f"(no Gated DeltaNet layers); drop the ablation or use a hybrid")
        for key, allowed in (("position_embedding", POSITION_EMBEDDINGS), ("norm", NORMS), ("decay", DECAYS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not one of {allowed}")
        if self.position_embedding == "learned" and (self.max_positions is None or self.max_positions < 1):
            raise ValueError(f"model.max_positions={self.max_positions} must be >= 1 with "
                             f"model.position_embedding=learned (the longest sequence, e.g. ${{task.seq_len}})")
        if self.decay == "channel" and (self.use_delta or not self.use_gate):
            raise ValueError(f"model.decay=channel is GLA's gate without the delta rule: it needs "
                             f"model.use_delta=false and model.use_gate=true (got {self.use_delta}, {self.use_gate})")
        if self.attention_bias and "attention" not in self.layer_mixers():
            raise ValueError("model.attention_bias=True has no effect without attention layers")
        if self.attention_window is not None and self.attention_window < 1:
            raise ValueError(f"model.attention_window={self.attention_window} must be >= 1 or null")
        if self.attention_heads is not None and self.attention_heads < 1:
            raise ValueError(f"model.attention_heads={self.attention_heads} must be >= 1 or null")
        if "attention" in self.layer_mixers():
            heads = self.num_attention_heads()
            if self.d_model % heads != 0:
                raise ValueError(f"model.d_model={self.d_model} is not divisible by attention heads {heads} "
                                 f"(set model.attention_heads)")
            if (self.d_model // heads) % 2 != 0 and self.position_embedding == "rope":
                raise ValueError(f"model.d_model={self.d_model} / attention heads {heads} = "
                                 f"{self.d_model // heads} must be even for RoPE (set model.attention_heads)")


class AutocastRMSNorm(nn.RMSNorm):
    """RMSNorm of the residual stream after the residual add: (residual, delta) -> (y, residual + delta), y in the
    autocast dtype where autocast is on. y feeds several Linears (the GDN layer's four projections, the MLP's two,
    the LM head): left in float32, autocast would cast it once per Linear, and backward would cast each gradient
    back and add them in float32 (the GDN model's step 118 -> 110 ms at T4096 on the H100).

    `ops.add_rms_norm` does the work: on the Triton backend under autocast one kernel reads the float32 residual
    and the block's bf16 output and writes their float32 sum and the bf16 y, and its backward adds the gradient
    of the sum from later layers to the norm's (eagerly those adds and casts cost ~6.4 ms per step at B8 T4096
    d1024, 8 layers, on the H100). Same parameters and state_dict as nn.RMSNorm; eps must be given."""

    def __init__(self, dim: int, eps: float, backend: str = "auto"):
        super().__init__(dim, eps=eps)
        self.backend = backend

    def forward(self, residual, delta=None):
        """residual [B, T, dim] (float32 under autocast); delta: residual's shape (bf16 under autocast) or None.
        Returns (y, the new residual = residual + delta, or residual itself without delta)."""
        device_type = residual.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return add_rms_norm(residual, delta, self.weight, eps=self.eps, out_dtype=dtype, backend=self.backend)


class AutocastLayerNorm(nn.LayerNorm):
    """LayerNorm (weight and bias) of the residual stream after the residual add, with AutocastRMSNorm's interface:
    (residual, delta) -> (y, residual + delta), y in the autocast dtype where autocast is on. Plain PyTorch: the
    norm of Zoology's blocks, for comparison, not a fast path."""

    def forward(self, residual, delta=None):
        residual = residual if delta is None else residual + delta
        y = super().forward(residual)                                          # float32 under autocast
        device_type = residual.device.type
        if torch.is_autocast_enabled(device_type):
            y = y.to(torch.get_autocast_dtype(device_type))
        return y, residual


def residual_norm(kind: str, dim: int, eps: float, backend: str) -> nn.Module:
    """The norm of the residual stream: ModelConfig.norm "rmsnorm" or "layernorm"."""
    return AutocastRMSNorm(dim, eps, backend) if kind == "rmsnorm" else AutocastLayerNorm(dim, eps=eps)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then + SwiGLU(norm(x)) (mlp_hidden_size None: no MLP), on
    x = residual + delta [B, T, d_model] (see the module docstring)."""

    def __init__(self, mixer: nn.Module, d_model: int, mlp_hidden_size: Optional[int], norm_eps: float, backend: str,
                 norm: str = "rmsnorm"):
        super().__init__()
        self.mixer_norm = residual_norm(norm, d_model, norm_eps, backend)
        self.mixer = mixer
        self.mlp = None
        if mlp_hidden_size is not None:
            self.mlp_norm = residual_norm(norm, d_model, norm_eps, backend)
            self.mlp = SwiGLU(d_model, mlp_hidden_size, backend)

    def forward(self, residual, delta=None, *, cu_seqlens=None, cache=None, use_cache=False):
        """(residual, delta) in -> (residual, delta, cache) out: the last sublayer's output is left for the next
        norm to add."""
        y, residual = self.mixer_norm(residual, delta)
        mixed, cache = self.mixer(y, cu_seqlens=cu_seqlens, cache=cache, use_cache=use_cache)
        if self.mlp is None:
            return residual, mixed, cache
        y, residual = self.mlp_norm(residual, mixed)
        return residual, self.mlp(y), cache


def build_mixer(cfg: ModelConfig, kind: str, mode: str, backend: str) -> nn.Module:
    if kind == "attention":
        return Attention(cfg.d_model, cfg.num_attention_heads(), window=cfg.attention_window,
                         rope_theta=cfg.rope_theta if cfg.position_embedding == "rope" else None,
                         bias=cfg.attention_bias)
    return GatedDeltaNet(cfg.d_model, cfg.num_heads, cfg.head_dim, expand_v=cfg.expand_v, conv_size=cfg.conv_size,
                         use_short_conv=cfg.use_short_conv, use_output_gate=cfg.use_output_gate,
                         use_qk_l2norm=cfg.use_qk_l2norm, use_gate=cfg.use_gate, use_delta=cfg.use_delta,
                         use_beta=cfg.use_beta, allow_neg_eigval=cfg.allow_neg_eigval, decay=cfg.decay,
                         norm_eps=cfg.norm_eps,
                         mode=mode, backend=backend)


def sample_next_token(logits, temperature: float, top_k=None, generator=None):
    """logits [B, vocab] -> LongTensor [B, 1]: argmax when temperature == 0, else a sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens (all when None)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 or None")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


class LanguageModel(nn.Module):
    """Causal language model over ModelConfig; see the module docstring for the computation.

    Init: with init_std None (default), every Linear ~ N(0, 1 / fan_in) and the embedding ~ N(0, 1), so
    activations keep unit scale at any width; with init_std set, every Linear and the embedding
    ~ N(0, init_std) as in GPT-2 and Zoology. The choice changes what learns: on MQAR, attention forms no
    previous-token head under the default init and solves the task under 0.02 (docs/results/mqar.md).
    Either way the projections that write into the residual stream (mixer o_proj, MLP down_proj) get their
    std divided by sqrt(2 * n_layers), so the residual stream's variance does not grow with depth. A learned
    position table starts as the embedding does, biases at 0, norms at 1; the short conv and the GDN decay
    parameters keep their layer's own init.

    Args:
        mode: Gated DeltaNet op form, "chunk" or "recurrent" (see `set_mode`).
        backend: op backend, "auto", "triton" or "torch".
    """

    RESIDUAL_OUTPUTS = ("o_proj", "down_proj")

    def __init__(self, cfg: ModelConfig, *, mode: str = "chunk", backend: str = "auto"):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embed = nn.Embedding(cfg.max_positions, cfg.d_model) \
            if cfg.position_embedding == "learned" else None
        mlp_hidden_size = swiglu_hidden_size(cfg.d_model, cfg.mlp_ratio) if cfg.mlp else None
        self.blocks = nn.ModuleList(
            Block(build_mixer(cfg, kind, mode, backend), cfg.d_model, mlp_hidden_size, cfg.norm_eps, backend,
                  cfg.norm)
            for kind in cfg.layer_mixers())
        self.norm = residual_norm(cfg.norm, cfg.d_model, cfg.norm_eps, backend)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for embedding in (self.embed, self.position_embed):
            if embedding is not None:
                nn.init.normal_(embedding.weight, std=1.0 if std is None else std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.weight is not self.embed.weight:
                module_std = module.in_features ** -0.5 if std is None else std
                if name.endswith(self.RESIDUAL_OUTPUTS):
                    module_std /= math.sqrt(2 * self.cfg.n_layers)
                nn.init.normal_(module.weight, std=module_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_mode(self, mode: str) -> None:
        """Switches every Gated DeltaNet layer to the op's "chunk" or "recurrent" form."""
        for block in self.blocks:
            if isinstance(block.mixer, GatedDeltaNet):
                block.mixer.set_mode(mode)

    def forward(self, input_ids, *, positions=None, cu_seqlens=None, cache=None, use_cache=False):
        """
        Args:
            input_ids: LongTensor [B, T].
            positions: LongTensor [B, P], or None for all T: the positions whose logits are wanted. The final
                norm and the LM head run on those rows only (a task scores a few answer tokens, and the head
                is the largest matrix of a small model).
            cu_seqlens: LongTensor [N + 1] of packed-sequence boundaries (B = 1): no token sees another
                sequence. Cannot be combined with a cache.
            cache: list with one entry per layer, as returned by a previous call with use_cache=True
                (GatedDeltaNet: conv and recurrent state; Attention: keys, values, position); None = start.
            use_cache: also return the cache after input_ids, to continue with the next tokens.
        Returns:
            logits [B, T, vocab_size] ([B, P, vocab_size] with positions) in the lm_head's compute dtype (bfloat16 under bf16 autocast: the loss
            reads them as they are, never as a float32 copy), or (logits, cache) when use_cache.
        """
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("cu_seqlens (packed sequences) cannot be combined with a cache")
        residual, delta = self.embed(input_ids), None                          # [B, T, d_model]
        if self.position_embed is not None:
            residual = residual + self.position_embed(self.token_positions(input_ids.shape[1], cu_seqlens, cache))
        new_cache = []
        for i, block in enumerate(self.blocks):
            residual, delta, layer_cache = block(residual, delta, cu_seqlens=cu_seqlens,
                                                 cache=None if cache is None else cache[i], use_cache=use_cache)
            new_cache.append(layer_cache)
        if positions is not None:
            index = positions[..., None].expand(-1, -1, residual.shape[-1])         # [B, P, d_model]
            residual, delta = residual.gather(1, index), delta.gather(1, index)
        y, _ = self.norm(residual, delta)
        logits = self.lm_head(y)
        return (logits, new_cache) if use_cache else logits

    def token_positions(self, T: int, cu_seqlens=None, cache=None) -> torch.Tensor:
        """Each token's position in its sequence, the rows of the learned position table: LongTensor [T]; after
        the tokens of `cache` (an attention layer's cache counts them), restarting at each packed-sequence start.
        ValueError for a sequence longer than model.max_positions."""
        device = self.position_embed.weight.device
        if cu_seqlens is not None:  # packed sequences run eagerly: reading their longest length here costs no graph
            positions, longest = positions_in_sequence(cu_seqlens, T), int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        else:
            start = 0
            if cache is not None:
                start = next((layer["position"] for layer in cache if layer and "position" in layer), None)
                if start is None:
                    raise ValueError("model.position_embedding=learned: decoding with a cache needs an attention "
                                     "layer, whose cache counts the tokens seen")
            positions, longest = torch.arange(start, start + T, device=device), start + T
        if longest > self.cfg.max_positions:
            raise ValueError(f"a sequence of {longest} tokens is longer than model.max_positions="
                             f"{self.cfg.max_positions} (the learned position table)")
        return positions

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (tied weights once); exclude_embeddings drops the embedding, position table and LM head
        matrices."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
            if self.position_embed is not None:
                total -= self.position_embed.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay on matrices (dim >= 2) only; none on vectors (norm weights, A_log,
        dt_bias) nor on parameters a layer lists in its `no_weight_decay_params`. Each parameter once."""
        exempt = {id(getattr(module, name)) for module in self.modules()
                  for name in getattr(module, "no_weight_decay_params", ())}
        decay, no_decay = [], []
        for param in self.parameters():
            (decay if param.dim() >= 2 and id(param) not in exempt else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def supports_static_decoding(self) -> bool:
        """True when every layer's cache keeps its shape from token to token (Gated DeltaNet layers only; an
        attention layer's KV cache grows by one token per step), so `StaticDecoder` and cuda_graph apply."""
        return all(isinstance(block.mixer, GatedDeltaNet) for block in self.blocks)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k=None, generator=None,
                 cuda_graph: Optional[bool] = None):
        """Continues input_ids [B, T] by max_new_tokens tokens; returns LongTensor [B, T + max_new_tokens].

        Greedy when temperature == 0, else samples (optionally from the top_k tokens) with `generator`.
        The prompt runs through one full forward that fills the cache; then one token per step.

        cuda_graph: replay each one-token step from a CUDA graph (`StaticDecoder`), which removes the Python and
            kernel-launch overhead of the step; sampling stays outside the graph. None (default) = on when
            input_ids is on CUDA and `supports_static_decoding()`, else the eager loop; True raises ValueError
            where it cannot run. Under autocast the graph re-casts the weights every step (no weight-cast
            cache), so for speed convert the model instead (model.to(torch.bfloat16)).
        """
        if cuda_graph and not self.supports_static_decoding():
            raise ValueError("cuda_graph=True needs a model of Gated DeltaNet layers only (an attention layer's "
                             "KV cache grows every token, which a CUDA graph cannot replay)")
        if cuda_graph and not input_ids.is_cuda:
            raise ValueError(f"cuda_graph=True needs input_ids on a CUDA device; got {input_ids.device}")
        if cuda_graph is None:
            cuda_graph = input_ids.is_cuda and self.supports_static_decoding()
        tokens = [input_ids]
        logits, cache = self(input_ids, use_cache=True)
        logits = logits[:, -1]                                                 # [B, vocab]
        decoder = None
        for step in range(max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_k, generator)   # [B, 1]
            tokens.append(next_token)
            if step + 1 == max_new_tokens:
                break
            if cuda_graph:
                if decoder is None:
                    decoder = StaticDecoder(self, cache)
                    decoder.capture()
                logits = decoder.step(next_token)
            else:
                logits, cache = self(next_token, cache=cache, use_cache=True)
                logits = logits[:, -1]
        return torch.cat(tokens, dim=1)


class StaticDecoder:
    """One-token decode steps of a LanguageModel on fixed buffers, so that `capture` can record a step in a
    CUDA graph once and every later `step` replays it.

    Buffers: the input token [B, 1]; the cache, one {"conv": [B, W-1, D] or None, "recurrent": [B, H, K, V]
    float32} per layer, whose tensors every step overwrites in place (the Triton decode kernel writes the
    recurrent state in place itself; the conv cache comes back as a new tensor and is copied over); and, once
    captured, the logits [B, vocab]. Without `capture`, `step` runs the same computation eagerly (on any
    device; this is what the CPU tests exercise).

    Args:
        model: a LanguageModel with `supports_static_decoding()`.
        cache: the cache after the prompt (model(prompt, use_cache=True)); the decoder takes its tensors over
            (made contiguous) and advances them step by step.
    """

    def __init__(self, model: LanguageModel, cache: list):
        if not model.supports_static_decoding():
            raise ValueError("StaticDecoder needs a model of Gated DeltaNet layers only (an attention layer's "
                             "KV cache grows every token)")
        self.model = model
        self.cache = [{name: None if t is None else t.contiguous() for name, t in layer.items()} for layer in cache]
        state = self.cache[0]["recurrent"]                                     # [B, H, K, V]
        self.token = torch.zeros(state.shape[0], 1, dtype=torch.long, device=state.device)
        self.graph = self.logits = None

    def _forward(self, cache: list):
        """One step on self.token from `cache`, whose tensors receive the new cache in place; logits [B, vocab]."""
        logits, new_cache = self.model(self.token, cache=cache, use_cache=True)
        for layer, new_layer in zip(cache, new_cache):
            for name, tensor in layer.items():
                if tensor is not None and new_layer[name] is not tensor:
                    tensor.copy_(new_layer[name])
        return logits[:, -1]

    def _autocast(self):
        """The caller's autocast without its weight-cast cache: casts cached during warm-up would be read by
        every replay after autocast had freed them (see torch's CUDA graph notes)."""
        device_type = self.token.device.type
        if not torch.is_autocast_enabled(device_type):
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)

    @torch.no_grad()
    def capture(self) -> None:
        """Records one step in a CUDA graph that `step` then replays. A warm-up step (Triton compilation,
        cuBLAS workspaces) runs first on a side stream, on a copy of the cache, so the cache is left as it was."""
        scratch = [{name: None if t is None else t.clone() for name, t in layer.items()} for layer in self.cache]
        with torch.cuda.device(self.token.device), self._autocast():
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                self._forward(scratch)
            torch.cuda.current_stream().wait_stream(side_stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward(self.cache)

    @torch.no_grad()
    def step(self, token):
        """token [B, 1] -> logits [B, vocab] of the next token; advances the cache. After `capture` the logits
        are the graph's output buffer, overwritten by the next step."""
        self.token.copy_(token)
        if self.graph is None:
            return self._forward(self.cache)
        self.graph.replay()
        return self.logits
