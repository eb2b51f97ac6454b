"""Export to fla / Hugging Face and import back: ours -> fla -> ours is the identity on weights and logits; the
exported names and shapes are exactly those of fla's own GatedDeltaNetForCausalLM; the written files hold our
weights exactly; what fla cannot represent is refused in one line; the command exports a real run. Where the
Triton interpreter runs, fla's own forward on CPU gives our logits, both ways."""
import json
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

from gdn_exp.export import (export_run, fla_config, from_fla, import_fla, load_ours, main,
                            model_config_from_fla, new_directory, read_weights, save_fla, to_fla)
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.nn.attention import attention_mask
from gdn_exp.train import run_job

SMALL = dict(vocab_size=50, d_model=64, n_layers=2, num_heads=2, head_dim=16)
CONFIGS = {
    "gdn": dict(),
    "no-output-gate-expand-v-tied": dict(use_output_gate=False, expand_v=2.0, tie_embeddings=True, mlp_ratio=3.0),
    "no-conv-neg-eigval": dict(use_short_conv=False, allow_neg_eigval=True, conv_size=3, norm_eps=1e-5),
    "hybrid-window": dict(n_layers=4, attention_every=2, attention_window=5, attention_heads=2, rope_theta=500.0),
    "attention": dict(mixer="attention", attention_heads=4),
}


def small_model(**overrides) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(**{**SMALL, **overrides}), backend="torch").eval()


def relative_rms(a, b) -> float:
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


@pytest.fixture
def fla_on_cpu(monkeypatch):
    """fla importable and constructible on CPU: attention layers need flash-attn, here a stand-in with its
    semantics (causal; window_size=(w - 1, 0): the query and w - 1 keys before it) built on torch's SDPA."""
    pytest.importorskip("fla")
    import fla.layers.attn

    def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)):                # q, k, v [B, T, H, D]
        positions = torch.arange(q.shape[1])
        mask = attention_mask(positions, positions, None if window_size[0] < 0 else window_size[0] + 1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2)

    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", flash_attn_func)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_round_trip_gives_identical_weights_and_logits(overrides):
    model = small_model(**overrides)
    fla_cfg, fla_state = to_fla(model, model.cfg)
    cfg, state = from_fla(json.loads(json.dumps(fla_cfg)), fla_state)            # config.json is JSON
    assert replace(cfg, name=model.cfg.name) == model.cfg
    original = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[name], original[name]) for name in original)
    back = LanguageModel(cfg, backend="torch").eval()
    back.load_state_dict(state)
    input_ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(input_ids), model(input_ids))


@pytest.mark.filterwarnings("ignore:ShortConvolution is crucial")  # fla's warning for use_short_conv=False
@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_names_and_shapes_are_those_of_fla_model(overrides, fla_on_cpu):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    model = small_model(**overrides)
    fla_cfg, state = to_fla(model, model.cfg)
    reference = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**fla_cfg)).state_dict()
    if model.cfg.tie_embeddings:  # tied: lm_head.weight is the embedding, which HF saves once
        assert reference["lm_head.weight"].data_ptr() == reference["model.embeddings.weight"].data_ptr()
        del reference["lm_head.weight"]
    assert {name: tuple(t.shape) for name, t in state.items()} == \
           {name: tuple(t.shape) for name, t in reference.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_written_weights_are_exactly_ours(dtype, tmp_path):
    model = small_model(**CONFIGS["hybrid-window"])
    fla_cfg, state = to_fla(model, model.cfg)
    save_fla(fla_cfg, state, new_directory(tmp_path / "out"), dtype)
    written = read_weights(tmp_path / "out")
    assert written.keys() == state.keys()
    assert all(written[name].dtype == dtype and torch.equal(written[name], state[name].to(dtype)) for name in state)
    assert json.loads((tmp_path / "out/config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    imported = import_fla(tmp_path / "out", backend="torch").state_dict()
    assert all(torch.equal(imported[name], t.to(dtype).float()) for name, t in model.state_dict().items())


@pytest.mark.parametrize("overrides, shown", [
    *((dict.fromkeys([key], False), f"model.{key}=false") for key in ("use_gate", "use_delta", "use_beta",
                                                                        "use_qk_l2norm", "mlp")),
    (dict(position_embedding="learned", max_positions=16), "model.position_embedding=learned"),
    (dict(norm="layernorm"), "model.norm=layernorm"),
    (dict(use_delta=False, decay="channel"), "model.decay=channel"),
    (dict(attention_every=2, attention_bias=True), "model.attention_bias=true"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_refuses_ablations_fla_cannot_represent(overrides, shown):
    model = small_model(**overrides)
    with pytest.raises(ValueError, match=shown) as error:
        to_fla(model, model.cfg)
    assert "\n" not in str(error.value)
    both = small_model(use_gate=False, use_beta=False)
    with pytest.raises(ValueError, match="use_gate=false .*; model.use_beta=false"):
        to_fla(both, both.cfg)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="delta_net"), "model_type='delta_net'"),
    (dict(num_v_heads=4), "num_v_heads=4"),
    (dict(output_gate_activation="sigmoid"), "output_gate_activation='sigmoid'"),
    (dict(hidden_act="powlu"), "hidden_act='powlu'"),
    (dict(intermediate_size=100), "intermediate_size=100"),
    (dict(attn={"layers": [0], "num_heads": 2}, num_hidden_layers=3), r"layers=\[0\]: ours puts attention at every"),
    (dict(attn={"layers": [1], "num_heads": 2, "num_kv_heads": 1}), "num_kv_heads=1"),
], ids=["model-type", "gva", "sigmoid-gate", "mlp", "mlp-width", "attention-layers", "gqa"])
def test_import_refuses_what_our_model_cannot_represent(change, message):
    fla_cfg = {**fla_config(ModelConfig(**SMALL)), **change}
    with pytest.raises(ValueError, match=message):
        model_config_from_fla(fla_cfg)


def test_import_refuses_unknown_weights_and_fills_fla_defaults():
    model = small_model()
    fla_cfg, state = to_fla(model, model.cfg)
    with pytest.raises(ValueError, match="q_conv1d.bias .*: our model has no place"):
        from_fla(fla_cfg, {**state, "model.layers.0.attn.q_conv1d.bias": torch.zeros(32)})
    with pytest.raises(ValueError, match="blocks.1.mixer.a_proj.weight has shape"):
        from_fla(fla_cfg, {**state, "model.layers.1.attn.a_proj.weight": torch.zeros(3, 64)})
    with pytest.raises(ValueError, match="no weight for our norm.weight"):
        from_fla(fla_cfg, {name: t for name, t in state.items() if name != "model.norm.weight"})
    # keys a config.json leaves out take fla's defaults (intermediate_size: 2/3 * 4 * d rounded up to 256, where
    # ours would round 853.3 up to 864)
    cfg = model_config_from_fla({"model_type": "gated_deltanet", "hidden_size": 320, "num_hidden_layers": 1})
    assert (cfg.num_heads, cfg.head_dim, cfg.expand_v, cfg.vocab_size) == (6, 256, 2.0, 32000)
    with torch.device("meta"):
        assert LanguageModel(cfg).blocks[0].mlp.up_proj.out_features == 1024


def test_export_command_on_trained_runs(compose, tmp_path, capsys):
    tiny = ["model=tiny", "logger=none", "trainer.max_steps=2", "trainer.eval_interval=2", "trainer.num_threads=1",
            "task.num_test=16"]
    run_job(compose(*tiny, "task=copy", "task.num_train=64"), tmp_path / "copy")
    main([str(tmp_path / "copy"), str(tmp_path / "hf")])
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    model = import_fla(tmp_path / "hf", backend="torch").eval()
    checkpoints = tmp_path / "copy/checkpoints"  # the export reads best.pt, else latest.pt
    checkpoint = checkpoints / "best.pt" if (checkpoints / "best.pt").is_file() else checkpoints / "latest.pt"
    trained = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[name], t) for name, t in trained.items())

    main(["--ours", str(tmp_path / "copy"), str(tmp_path / "ours")])
    ours = load_ours(tmp_path / "ours", backend="torch").eval()
    input_ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours(input_ids), model(input_ids))

    ablated = small_model(use_delta=False)  # a run dir as the trainer leaves it, of a model fla cannot hold
    (tmp_path / "ablated/checkpoints").mkdir(parents=True)
    torch.save({"model": ablated.state_dict(), "config": {"model": asdict(ablated.cfg), "task": {"name": "copy"},
                                                          "kernel": {"mode": "chunk", "backend": "torch"}}},
               tmp_path / "ablated/checkpoints/best.pt")
    for argv, message in [([str(tmp_path / "copy"), str(tmp_path / "hf")], "not an empty directory"),
                          ([str(tmp_path / "nothing"), str(tmp_path / "new")], "no readable checkpoints/best.pt"),
                          ([str(tmp_path / "ablated"), str(tmp_path / "new")], "represent model.use_delta=false")]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1

    # a byte-level LM run: the tokenizer files encode text as training did (BOS, then UTF-8 bytes)
    transformers = pytest.importorskip("transformers")  # writes and reads the tokenizer files
    from gdn_exp.data.lm import ByteTokenizer

    run_job(compose(*tiny, "task=lm", "task.seq_len=32"), tmp_path / "lm")
    export_run(tmp_path / "lm", tmp_path / "lm_hf")

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "lm_hf"))
    text = "Ünïcode words,\n\ttabs and  spaces ~"
    assert tokenizer(text)["input_ids"] == ByteTokenizer().encode(text)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert json.loads((tmp_path / "lm_hf/config.json").read_text())["bos_token_id"] == 256


@pytest.mark.interpreter
def test_fla_forward_gives_our_logits_both_ways(fla_on_cpu, monkeypatch, tmp_path):
    """fla's own model on CPU (its Triton kernels interpreted; T <= 64 in eval runs its fused_recurrent form)."""
    from triton.runtime import autotuner

    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    # the interpreter has no benchmark driver: each autotuned kernel runs its first config, untimed (Triton 3.6
    # times even a single config)
    prune = autotuner.Autotuner.prune_configs
    monkeypatch.setattr(autotuner.Autotuner, "prune_configs", lambda self, kwargs: prune(self, kwargs)[:1])
    monkeypatch.setattr(autotuner.Autotuner, "_bench", lambda self, *args, config, **meta: [0.0, 0.0, 0.0])
    cpu = dict(fuse_norm=False, fuse_swiglu=False)  # fla's fused norm and SwiGLU modules assume CUDA
    input_ids = torch.randint(0, 50, (2, 24))

    model = small_model(**CONFIGS["hybrid-window"])
    save_fla(*to_fla(model, model.cfg), new_directory(tmp_path / "ours"))
    fla_model = GatedDeltaNetForCausalLM.from_pretrained(str(tmp_path / "ours"), **cpu).eval()
    with torch.no_grad():
        assert relative_rms(fla_model(input_ids, use_cache=False).logits, model(input_ids)) < 1e-5

    # fla's own init, 10x its default scale: at std 0.02 |q|^2, |k|^2 ~ 1e-3 and the L2 norms' one difference
    # (fla: x / sqrt(|x|^2 + 1e-6), ours: x / max(|x|, 1e-12)) alone moves the logits by 5e-3 relative RMS
    torch.manual_seed(1)  # fla's use_gate=False is our use_output_gate=False
    fla_cfg = GatedDeltaNetConfig(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_heads=2, head_dim=16,
                                  use_gate=False, allow_neg_eigval=True, initializer_range=0.2, **cpu)
    fla_model = GatedDeltaNetForCausalLM(fla_cfg).eval()
    fla_model.save_pretrained(str(tmp_path / "fla"))
    model = import_fla(tmp_path / "fla", backend="torch").eval()
    assert not model.cfg.use_output_gate and model.cfg.allow_neg_eigval
    with torch.no_grad():
        assert relative_rms(model(input_ids), fla_model(input_ids, use_cache=False).logits) < 1e-5
