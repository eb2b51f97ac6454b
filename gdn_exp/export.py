"""Export to flash-linear-attention (fla) / Hugging Face format, and import fla checkpoints.

    gdn-exp-export RUN_DIR OUT_DIR                  # fla GatedDeltaNetForCausalLM: config.json, model.safetensors,
                                                    # tokenizer files (task=lm runs)
    gdn-exp-export RUN_DIR OUT_DIR --dtype bfloat16
    gdn-exp-export --ours RUN_DIR OUT_DIR           # our own names: OUT_DIR/model.safetensors, model config in
                                                    # its metadata (load_ours reads it back)

Loading an export (importing fla registers its model types with transformers' Auto classes):

    import fla  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(OUT_DIR)    # fla.models.GatedDeltaNetForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(OUT_DIR)      # task=lm runs only

fla's model runs on a GPU only: its Triton kernels' autotuner needs a GPU driver (our tests stub it out). On a CPU,
`import_fla(OUT_DIR)` (below) gives the same logits from our PyTorch path.

Importing an fla checkpoint (a directory with config.json and model.safetensors, sharded safetensors or
pytorch_model.bin) to evaluate or fine-tune it here:

    from gdn_exp.export import import_fla
    model = import_fla("path/to/fla_model")                 # LanguageModel with the checkpoint's weights
    logits = model.eval()(input_ids)                        # the logits fla's model gives

Names (i = layer; H heads, K = head_dim, V = head_dim * expand_v, d = d_model, W = conv_size):

    ours                                    fla
    embed.weight                            model.embeddings.weight
    blocks.i.mixer_norm.weight              model.layers.i.attn_norm.weight
    blocks.i.mixer.qkv_proj.weight          model.layers.i.attn.{q,k,v}_proj.weight     rows split [HK, HK, HV]
    blocks.i.mixer.conv.weight [D, W]       model.layers.i.attn.{q,k,v}_conv1d.weight   [HK | HK | HV, 1, W]
    blocks.i.mixer.{a_proj,b_proj,g_proj,o_proj}.weight, .A_log, .dt_bias, .o_norm.weight   same under attn.
    blocks.i.mlp_norm.weight                model.layers.i.mlp_norm.weight
    blocks.i.mlp.{gate,up,down}_proj.weight model.layers.i.mlp.{gate,up,down}_proj.weight
    norm.weight, lm_head.weight             model.norm.weight, lm_head.weight (left out when tied, as HF saves)
    attention layers (hybrids, mixer=attention): qkv_proj.weight [3d, d] -> attn.{q,k,v}_proj.weight, o_proj the
    same; fla builds them from config.json's `attn` spec (layers, heads, window, rope_theta) and needs flash-attn.

Every numeric convention is the same on both sides (checked against fla 0.6.0's source): the decay
g = -exp(A_log) * softplus(x W_a + dt_bias), beta = sigmoid(x W_b) (times 2 with allow_neg_eigval), q and k
SiLU'd after the causal conv (SiLU alone without it) and L2-normalised, scale K^-0.5, the output RMSNorm over V
times silu(x W_g) (fla: use_gate=True, FusedRMSNormGated, activation swish), pre-norm blocks with SwiGLU MLPs
silu(gate) * up, one norm_eps for every RMSNorm, RoPE in the rotate-half layout with frequencies
theta^(-2i/D), a sliding window of `window` keys including the query's own. The one numeric difference: fla
L2-normalises x / sqrt(|x|^2 + 1e-6), ours x / max(|x|, 1e-12) (relative 1e-6 / |x|^2: below bf16 noise).

What fla's GatedDeltaNet cannot represent (export refuses, naming the key): use_gate=false (fla always decays;
its use_gate is our use_output_gate), use_delta=false (always the delta rule), use_beta=false (always a learned
sigmoid beta), use_qk_l2norm=false (always L2-normalises). Import refuses what our model cannot hold: grouped
value heads (num_v_heads != num_heads), a sigmoid output gate, non-SwiGLU MLPs, attention residuals, grouped-KV
or biased attention, and attention layers not at every n-th layer.
"""
import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.nn import swiglu_hidden_size
from gdn_exp.train.checkpoint import set_default_mode

FLA_MODEL_TYPE = "gated_deltanet"
FLA_ARCHITECTURE = "GatedDeltaNetForCausalLM"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OURS_METADATA_KEY = "gdn_exp.model_config"   # --ours: the ModelConfig as JSON in the safetensors header

# Ablations that fla's GatedDeltaNet has no form for: ModelConfig key -> (the refused value, why).
UNREPRESENTABLE = {
    "use_gate": (False, "fla's GatedDeltaNet always decays the state (A_log, dt_bias, a_proj); "
                        "its use_gate is our use_output_gate"),
    "use_delta": (False, "fla's GatedDeltaNet always applies the delta rule"),
    "use_beta": (False, "fla's GatedDeltaNet always learns beta = sigmoid(x W_b)"),
    "use_qk_l2norm": (False, "fla's GatedDeltaNet always L2-normalises q and k"),
    "position_embedding": ("learned", "fla's attention rotates q and k (RoPE) and has no position table"),
    "mlp": (False, "fla's blocks always have an MLP"),
    "decay": ("channel", "fla's GatedDeltaNet decays each head by one number"),
    "norm": ("layernorm", "fla's blocks use RMSNorm"),
    "attention_bias": (True, "fla's attention has no output bias"),
}

# fla 0.6.0's GatedDeltaNetConfig defaults for the keys read here: what fla assumes when config.json omits one.
FLA_DEFAULTS = {"hidden_size": 2048, "expand_v": 2.0, "use_gate": True, "use_short_conv": True,
                "allow_neg_eigval": False, "conv_size": 4, "head_dim": 256, "num_heads": 6, "num_v_heads": None,
                "hidden_ratio": 4, "intermediate_size": None, "hidden_act": "swish", "num_hidden_layers": 21,
                "norm_eps": 1e-6, "attn": None, "tie_word_embeddings": False, "vocab_size": 32000,
                "attnres_block_size": None, "output_gate_activation": "swish"}

# Our module names -> fla's, outside the mixers' fused tensors.
TOP_NAMES = {"embed.weight": "model.embeddings.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
BLOCK_NAMES = {"mixer_norm": "attn_norm", "mixer": "attn", "mlp_norm": "mlp_norm", "mlp": "mlp"}


def fused_splits(cfg: ModelConfig, kind: str) -> dict:
    """Our fused tensors of one mixer -> [(fla name, rows)]: our tensor's rows are fla's tensors stacked in order."""
    if kind == "attention":
        d = cfg.d_model
        return {"qkv_proj.weight": [("q_proj.weight", d), ("k_proj.weight", d), ("v_proj.weight", d)]}
    HK, HV = cfg.num_heads * cfg.head_dim, cfg.num_heads * int(cfg.head_dim * cfg.expand_v)
    splits = {"qkv_proj.weight": [("q_proj.weight", HK), ("k_proj.weight", HK), ("v_proj.weight", HV)]}
    if cfg.use_short_conv:  # ours [D, W]; fla's ShortConvolution is a depthwise nn.Conv1d, weight [D, 1, W]
        splits["conv.weight"] = [("q_conv1d.weight", HK), ("k_conv1d.weight", HK), ("v_conv1d.weight", HV)]
    return splits


# ---------------------------------------------------------------------------------------------- ours -> fla

def unsupported(cfg: ModelConfig) -> list:
    """Why fla's GatedDeltaNetForCausalLM cannot hold a model of cfg: one 'model.key=value (why)' per key."""
    return [f"model.{key}={str(value).lower()} ({why})" for key, (value, why) in UNREPRESENTABLE.items()
            if getattr(cfg, key) == value]


def fla_config(cfg: ModelConfig) -> dict:
    """config.json of fla's GatedDeltaNetForCausalLM for a model of cfg (attention layers as its `attn` spec)."""
    attention_layers = [i for i, kind in enumerate(cfg.layer_mixers()) if kind == "attention"]
    heads = cfg.num_attention_heads()
    attn = None if not attention_layers else {
        "layers": attention_layers, "num_heads": heads, "num_kv_heads": heads, "qkv_bias": False,
        "window_size": cfg.attention_window, "rope_theta": cfg.rope_theta}
    return {"architectures": [FLA_ARCHITECTURE], "model_type": FLA_MODEL_TYPE,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_heads": cfg.num_heads, "num_v_heads": None, "head_dim": cfg.head_dim, "expand_v": cfg.expand_v,
            "use_gate": cfg.use_output_gate, "output_gate_activation": "swish",
            "use_short_conv": cfg.use_short_conv, "conv_size": cfg.conv_size,
            "allow_neg_eigval": cfg.allow_neg_eigval, "attn": attn,
            "hidden_ratio": cfg.mlp_ratio, "intermediate_size": swiglu_hidden_size(cfg.d_model, cfg.mlp_ratio),
            "hidden_act": "swish", "norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "attn_mode": "chunk", "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def fla_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """Our state dict -> fla's names and shapes. The tensors are views of ours (same dtype); lm_head.weight is
    left out when tied to the embedding (as Hugging Face saves tied weights)."""
    mixers = cfg.layer_mixers()
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if not name.startswith("blocks."):
            out[TOP_NAMES[name]] = tensor
            continue
        _, i, module, rest = name.split(".", 3)
        prefix = f"model.layers.{i}.{BLOCK_NAMES[module]}."
        splits = fused_splits(cfg, mixers[int(i)]).get(rest) if module == "mixer" else None
        if splits is None:
            out[prefix + rest] = tensor
            continue
        for (fla_name, _), piece in zip(splits, tensor.split([rows for _, rows in splits])):
            out[prefix + fla_name] = piece.unsqueeze(1) if fla_name.endswith("conv1d.weight") else piece
    return out


def to_fla(model: LanguageModel, model_cfg: ModelConfig) -> tuple:
    """(config.json dict, state dict in fla's names) for fla's GatedDeltaNetForCausalLM; ValueError in one line
    naming every key fla cannot represent."""
    reasons = unsupported(model_cfg)
    if reasons:
        raise ValueError(f"fla's GatedDeltaNet cannot represent {'; '.join(reasons)}")
    return fla_config(model_cfg), fla_state_dict(model.state_dict(), model_cfg)


# ---------------------------------------------------------------------------------------------- fla -> ours

def mlp_ratio_for(d_model: int, hidden: int, hint) -> float:
    """An mlp_ratio whose swiglu_hidden_size(d_model, ratio) is `hidden`: `hint` (fla's hidden_ratio) if it gives
    it, else one in the middle of hidden's rounding step, which float rounding cannot push out of it."""
    if hidden % 16:
        raise ValueError(f"fla config intermediate_size={hidden}: our SwiGLU width is a multiple of 16")
    if hint is not None and swiglu_hidden_size(d_model, hint) == hidden:
        return hint
    return (hidden - 8) * 3 / (2 * d_model)


def attention_layout(attn, n_layers: int) -> dict:
    """fla's `attn` spec -> ModelConfig's mixer, attention_every, attention_heads, attention_window, rope_theta."""
    if not attn:
        return {"mixer": "gdn", "attention_every": 0}
    specs = [attn] if isinstance(attn, dict) else list(attn)
    settings = {(s["num_heads"], s.get("num_kv_heads") or s["num_heads"], s.get("qkv_bias", False),
                 s.get("window_size"), s.get("rope_theta", 10000.0)) for s in specs}
    if len(settings) > 1:
        raise ValueError(f"fla config attn: {len(settings)} different attention settings; ours has one")
    heads, kv_heads, qkv_bias, window, rope_theta = settings.pop()
    if kv_heads != heads or qkv_bias:
        raise ValueError(f"fla config attn: num_kv_heads={kv_heads}, qkv_bias={qkv_bias}; ours has "
                         f"num_kv_heads = num_heads ({heads}) and no biases")
    layers = sorted(i for s in specs for i in s["layers"])
    layout = {"attention_heads": heads, "attention_window": window, "rope_theta": rope_theta}
    if layers == list(range(n_layers)):
        return {"mixer": "attention", "attention_every": 0, **layout}
    every = layers[0] + 1
    if layers != [i for i in range(n_layers) if (i + 1) % every == 0]:
        raise ValueError(f"fla config attn layers={layers}: ours puts attention at every n-th layer only")
    return {"mixer": "gdn", "attention_every": every, **layout}


def model_config_from_fla(fla_cfg: dict) -> ModelConfig:
    """The ModelConfig of an fla GatedDeltaNetForCausalLM config.json (missing keys take fla's defaults);
    ValueError naming the first key our model cannot represent."""
    c = {**FLA_DEFAULTS, **fla_cfg}
    if fla_cfg.get("model_type") != FLA_MODEL_TYPE:
        raise ValueError(f"model_type={fla_cfg.get('model_type')!r}: only fla's {FLA_MODEL_TYPE!r} "
                         f"({FLA_ARCHITECTURE}) is imported")
    checks = [("num_v_heads", c["num_v_heads"] in (None, c["num_heads"]), "grouped value heads"),
              ("output_gate_activation", c["output_gate_activation"] in ("swish", "silu") or not c["use_gate"],
               "our output gate is silu"),
              ("hidden_act", c["hidden_act"] == "swish", "our MLP is SwiGLU"),
              ("attnres_block_size", c["attnres_block_size"] is None, "attention residuals")]
    for key, ok, why in checks:
        if not ok:
            raise ValueError(f"fla config {key}={c[key]!r}: our model has no form for it ({why})")
    d_model = c["hidden_size"]
    hidden = c["intermediate_size"]
    if hidden is None:  # fla's GatedMLP default: 2/3 * hidden_ratio * hidden_size, rounded up to 256
        hidden = 256 * math.ceil(int(d_model * (c["hidden_ratio"] or 4) * 2 / 3) / 256)
    layout = attention_layout(c["attn"], c["num_hidden_layers"])
    default_heads = ModelConfig(d_model=d_model).num_attention_heads()
    if layout.get("attention_heads") == default_heads:
        layout["attention_heads"] = None
    switches = {"use_output_gate": c["use_gate"], "use_short_conv": c["use_short_conv"],
                "allow_neg_eigval": c["allow_neg_eigval"]}
    if layout["mixer"] == "attention":  # no GDN layer: ModelConfig refuses GDN switches it would ignore
        switches = {}
    cfg = ModelConfig(name="fla", vocab_size=c["vocab_size"], d_model=d_model, n_layers=c["num_hidden_layers"],
                      num_heads=c["num_heads"], head_dim=c["head_dim"], expand_v=c["expand_v"],
                      mlp_ratio=mlp_ratio_for(d_model, hidden, c["hidden_ratio"]), conv_size=c["conv_size"],
                      norm_eps=c["norm_eps"], tie_embeddings=c["tie_word_embeddings"], **switches, **layout)
    cfg.validate()
    return cfg


def state_dict_from_fla(state: dict, cfg: ModelConfig) -> dict:
    """fla's state dict -> ours (the inverse of fla_state_dict; a tied lm_head.weight is the embedding).
    ValueError on a weight our model has no place for (e.g. a conv bias)."""
    state = dict(state)
    out = {}
    for i, kind in enumerate(cfg.layer_mixers()):  # the fused tensors: stack fla's pieces
        prefix = f"model.layers.{i}.attn."
        for ours, pieces in fused_splits(cfg, kind).items():
            missing = [prefix + name for name, _ in pieces if prefix + name not in state]
            if missing:
                raise ValueError(f"fla checkpoint has no {missing[0]}")
            out[f"blocks.{i}.mixer.{ours}"] = torch.cat([state.pop(prefix + name).flatten(1) if "conv1d" in name
                                                          else state.pop(prefix + name) for name, _ in pieces])
    top = {fla: ours for ours, fla in TOP_NAMES.items()}
    block = {fla: ours for ours, fla in BLOCK_NAMES.items()}
    for name, tensor in state.items():
        parts = name.split(".", 4)
        if name in top:
            out[top[name]] = tensor
        elif name.startswith("model.layers.") and len(parts) == 5 and parts[3] in block:
            out[f"blocks.{parts[2]}.{block[parts[3]]}.{parts[4]}"] = tensor
        else:
            raise ValueError(f"fla checkpoint weight {name}: our model has no place for it")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def from_fla(fla_config_dict: dict, state_dict: dict) -> tuple:
    """(ModelConfig, our state dict) of an fla GatedDeltaNetForCausalLM's config.json and weights; ValueError in
    one line when a weight is missing, has no place in our model (e.g. a conv bias) or has another shape."""
    cfg = model_config_from_fla(fla_config_dict)
    state = state_dict_from_fla(state_dict, cfg)
    with torch.device("meta"):  # our model's names and shapes, without allocating it
        expected = {name: t.shape for name, t in LanguageModel(cfg, backend="torch").state_dict().items()}
    for name in state.keys() - expected.keys():
        raise ValueError(f"fla checkpoint weight {name} (ours): our model has no place for it")
    for name in expected:
        if name not in state:
            raise ValueError(f"fla checkpoint has no weight for our {name}")
        if state[name].shape != expected[name]:
            raise ValueError(f"fla checkpoint weight for our {name} has shape {tuple(state[name].shape)}, "
                             f"config.json implies {tuple(expected[name])}")
    return cfg, state


# ---------------------------------------------------------------------------------------------- files

def require(module: str, why: str):
    """Imports an optional dependency, or ValueError in one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{why} needs the {module.split('.')[0]} package (pip install "
                         f"{module.split('.')[0]})") from None


def new_directory(path: Path) -> Path:
    """Creates path; ValueError if it holds anything (an export never mixes with older files)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} exists and is not an empty directory; choose a new one")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_safetensors(tensors: dict, path: Path, dtype: torch.dtype, metadata: Optional[dict] = None) -> None:
    """Writes tensors as dtype copies (safetensors refuses views that share storage, like fla's q/k/v pieces)."""
    safetensors_torch = require("safetensors.torch", "writing model.safetensors")
    tensors = {name: t.detach().to(dtype=dtype, copy=True).contiguous() for name, t in tensors.items()}
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    set_default_mode(path)


def read_weights(path: Path) -> dict:
    """The state dict of a Hugging Face model directory: model.safetensors, its sharded form (with
    model.safetensors.index.json) or pytorch_model.bin."""
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        load_file = require("safetensors.torch", f"reading {path}").load_file
        if (path / "model.safetensors").is_file():
            return load_file(str(path / "model.safetensors"))
        shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
        return {name: t for shard in sorted(shards) for name, t in load_file(str(path / shard)).items()}
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def save_fla(fla_cfg: dict, state: dict, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Writes config.json and model.safetensors (tensors in dtype) into out_dir."""
    save_safetensors(state, out_dir / "model.safetensors", dtype)
    config = {**fla_cfg, "dtype": str(dtype).removeprefix("torch.")}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def import_fla(path, *, mode: str = "chunk", backend: str = "auto") -> LanguageModel:
    """Our LanguageModel (float32 parameters, train mode) with the weights of the fla GatedDeltaNetForCausalLM
    in the Hugging Face directory `path`; mode and backend as in LanguageModel."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json (expected a Hugging Face model directory)")
    cfg, state = from_fla(json.loads((path / "config.json").read_text()), read_weights(path))
    model = LanguageModel(cfg, mode=mode, backend=backend)
    model.load_state_dict(state)  # strict: a missing or unexpected weight is an error
    return model


def byte_tokenizer(bos_id: int):
    """gdn_exp.data.lm.ByteTokenizer as a Hugging Face tokenizer: UTF-8 byte b is id b, `<bos>` is bos_id and
    starts every encoded text (add_special_tokens=True), as it starts every document in training."""
    tokenizers = require("tokenizers", "the byte tokenizer's files")
    transformers = require("transformers", "the byte tokenizer's files")
    # byte-level BPE stands each byte for a printable character; with no merges every byte is one token
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char_of = {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
    vocab = {char_of[b]: b for b in range(256)} | {"<bos>": bos_id}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens(["<bos>"])
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A",
                                                                         special_tokens=[("<bos>", bos_id)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>")


def run_tokenizer(task: dict):
    """(Hugging Face tokenizer, bos id, eos id) of a task=lm run, or None for the synthetic tasks (ids only)."""
    if task.get("name") != "lm":
        return None
    from gdn_exp.data.lm import ByteTokenizer, make_tokenizer

    try:
        tokenizer = make_tokenizer(task["tokenizer"])
    except ValueError as e:
        raise ValueError(f"{e} (or export without it: --no-tokenizer)") from None
    if isinstance(tokenizer, ByteTokenizer):
        return byte_tokenizer(tokenizer.bos_id), tokenizer.bos_id, None
    return tokenizer.tokenizer, tokenizer.bos_id, tokenizer.tokenizer.eos_token_id


def export_run(run_dir, out_dir, *, dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> Path:
    """Writes the run's model (checkpoints/best.pt, else latest.pt) as an fla GatedDeltaNetForCausalLM directory:
    config.json, model.safetensors and, for task=lm runs (unless tokenizer=False), the tokenizer's files."""
    from gdn_exp.longcontext import load_run

    model, config = load_run(Path(run_dir))
    fla_cfg, state = to_fla(model, model.cfg)
    found = run_tokenizer(config["task"]) if tokenizer else None
    if found is not None:
        fla_cfg.update(bos_token_id=found[1], eos_token_id=found[2])
    out_dir = new_directory(Path(out_dir))
    save_fla(fla_cfg, state, out_dir, dtype)
    if found is not None:
        found[0].save_pretrained(str(out_dir))
    return out_dir


def export_ours(run_dir, out_dir, *, dtype: torch.dtype = torch.float32) -> Path:
    """Writes the run's weights under our own names as out_dir/model.safetensors, the ModelConfig as JSON in its
    metadata (a tied lm_head.weight left out); `load_ours` reads it back."""
    from gdn_exp.longcontext import load_run

    model, _ = load_run(Path(run_dir))
    state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
    out_dir = new_directory(Path(out_dir))
    save_safetensors(state, out_dir / "model.safetensors", dtype, {OURS_METADATA_KEY: json.dumps(asdict(model.cfg))})
    return out_dir


def load_ours(path, *, mode: str = "chunk", backend: str = "auto") -> LanguageModel:
    """The LanguageModel of an `export_ours` file (or the directory holding model.safetensors)."""
    safetensors = require("safetensors", "reading model.safetensors")
    path = Path(path)
    path = path / "model.safetensors" if path.is_dir() else path
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if OURS_METADATA_KEY not in metadata:
            raise ValueError(f"{path}: no {OURS_METADATA_KEY} in its metadata (not written by gdn-exp-export --ours)")
        state = {name: f.get_tensor(name) for name in f.keys()}
    model = LanguageModel(ModelConfig(**json.loads(metadata[OURS_METADATA_KEY])), mode=mode, backend=backend)
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="gdn-exp-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a gdn-exp run directory (with checkpoints/)")
    parser.add_argument("out_dir", type=Path, help="the directory to write (new or empty)")
    parser.add_argument("--ours", action="store_true",
                        help="write our own weight names (model.safetensors, model config in its metadata) "
                             "instead of fla's Hugging Face directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files (task=lm runs)")
    args = parser.parse_args(argv)
    try:
        if args.ours:
            out = export_ours(args.run_dir, args.out_dir, dtype=DTYPES[args.dtype])
        else:
            out = export_run(args.run_dir, args.out_dir, dtype=DTYPES[args.dtype], tokenizer=not args.no_tokenizer)
    except ValueError as e:  # a user's mistake or a model fla cannot hold: one line, no traceback
        print(f"gdn-exp-export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")
    if not args.ours and not torch.cuda.is_available():
        print(f"note: fla runs this model on a GPU only (its Triton kernels' autotuner needs a GPU driver); on a CPU "
              f"load it here: gdn_exp.export.import_fla('{out}')")
    if not args.ours and json.loads((out / "config.json").read_text())["attn"]:
        print("note: fla builds its attention layers with flash-attn (pip install flash-attn) to load this model")


if __name__ == "__main__":
    main()
