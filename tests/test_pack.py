"""Packs (`gdn_exp.pack`, `gdn_exp.train.pack`): in float64 on the CPU every model of a pack reproduces its solo
run (logged metrics and final weights to 1e-10 relative) for each mixer; the stacked AdamW and clipping are
torch's per model; a diverging model stays alone; a stopped pack checkpoints every model and resumes."""
import json
import math
import os
import signal

import pytest
import torch

from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.pack import ModelPack
from gdn_exp.train import run_job
from gdn_exp.train.loop import StopRequest
from gdn_exp.train.pack import run_pack
from gdn_exp.train.pack_step import StackedAdamW, clip_grad_norms

TOLERANCE = 1e-10
TINY = ["model=tiny", "model.d_model=32", "model.head_dim=16", "task=copy", "task.seq_len=16", "task.copy_len=6",
        "task.num_train=64", "task.num_test=16", "logger=none", "trainer.batch_size=4", "trainer.max_steps=6",
        "trainer.warmup_steps=2", "trainer.log_interval=1", "trainer.eval_interval=3",
        "trainer.checkpoint_interval=3", "trainer.target_accuracy=null"]
MIXERS = {"gdn": [], "no_delta": ["ablation=no_delta"], "no_gate": ["ablation=no_gate"],
          "attention": ["ablation=attention", "model.attention_heads=2"],
          "hybrid": ["model.attention_every=2", "model.attention_heads=2"]}
# the models of a pack differ in every key that keeps the shapes
MEMBERS = [["seed=0"], ["seed=1", "trainer.lr=1e-2", "trainer.weight_decay=0.0", "trainer.warmup_steps=0",
                        "trainer.grad_clip=0.05", "trainer.betas=[0.8,0.99]", "model.init_std=0.02"]]


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def relative(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp(min=1e-300))


def assert_same_run(solo_dir, pack_dir, tolerance=TOLERANCE, stopped_at=None):
    """Same metrics rows (perf/* aside) and the same weights in every checkpoint, to `tolerance` relative. A run
    stopped at step `stopped_at` has evaluated there too (as a solo run does): that row is left out."""
    solo = rows(solo_dir)
    pack = [r for r in rows(pack_dir) if not (r["step"] == stopped_at and "test/loss" in r)]
    assert [(r["step"], sorted(r)) for r in solo] == [(r["step"], sorted(r)) for r in pack]
    for a, b in zip(solo, pack):
        for key in a:
            if key != "step" and not key.startswith("perf/"):
                assert a[key] == pytest.approx(b[key], rel=tolerance, abs=1e-300), (a["step"], key)
    for name in ("latest.pt", "best.pt"):
        a, b = (torch.load(d / "checkpoints" / name, weights_only=True) for d in (solo_dir, pack_dir))
        assert a["counters"].keys() == b["counters"].keys()
        for state in a, b:
            state["config"]["trainer"].pop("resume")
        assert a["config"] == b["config"]
        for key, weight in a["model"].items():
            assert relative(b["model"][key], weight) <= tolerance, (name, key)
    a, b = (json.loads((d / "results.json").read_text()) for d in (solo_dir, pack_dir))
    assert a["status"] == b["status"] and a["steps"] == b["steps"]
    assert a["test/accuracy"] == b["test/accuracy"]
    assert set(a) ^ set(b) <= {"pack_size"}  # a pack says its size


@pytest.mark.parametrize("mixer", MIXERS)
def test_pack_reproduces_solo_runs(compose, tmp_path, float64, mixer):
    cfgs = [compose(*TINY, *MIXERS[mixer], *member) for member in MEMBERS]
    for i, cfg in enumerate(cfgs):
        assert run_job(cfg, tmp_path / f"solo{i}")["status"] == "completed"
    results = run_pack(cfgs, [tmp_path / f"pack{i}" for i in range(len(cfgs))])
    assert [r["status"] for r in results] == ["completed"] * len(cfgs), results[0].get("traceback")
    for i in range(len(cfgs)):
        assert_same_run(tmp_path / f"solo{i}", tmp_path / f"pack{i}")
    latest = torch.load(tmp_path / "pack1" / "checkpoints" / "latest.pt", weights_only=True)
    model = LanguageModel(ModelConfig(**latest["config"]["model"]))
    model.load_state_dict(latest["model"])  # a pack's checkpoint is a solo model's


def test_stacked_adamw_is_torch_adamw_per_model(float64):
    """Three models with their own lr, betas, eps, weight decay and clipping, one of them frozen for a step: each
    follows torch.optim.AdamW (fused, as the solo run) and clip_grad_norm_ on its own."""
    cfg = ModelConfig(vocab_size=16, d_model=16, n_layers=1, num_heads=2, head_dim=8)
    models = [LanguageModel(cfg, backend="torch") for _ in range(3)]
    pack = ModelPack(models)
    hyper = [dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=1.0),
             dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, clip=0.01),
             dict(lr=1e-1, betas=(0.5, 0.9), eps=1e-8, weight_decay=0.5, clip=1e9)]
    stacked = StackedAdamW(pack, betas=[h["betas"] for h in hyper], eps=[h["eps"] for h in hyper],
                           weight_decay=[h["weight_decay"] for h in hyper])
    solo = [torch.optim.AdamW(m.param_groups(h["weight_decay"]), lr=h["lr"], betas=h["betas"], eps=h["eps"],
                              fused=True) for m, h in zip(models, hyper)]
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        active = torch.tensor([True, step != 1, True])
        grads = {name: torch.randn(p.shape, generator=generator) for name, p in pack.params.items()}
        for name, p in pack.params.items():
            p.grad.copy_(grads[name])  # into flat_grad
        norms = clip_grad_norms(pack.flat_grad, torch.tensor([h["clip"] for h in hyper]))
        stacked.step(torch.tensor([h["lr"] for h in hyper]), active)
        for i, (model, optimizer, h) in enumerate(zip(models, solo, hyper)):
            for name, p in model.named_parameters():
                p.grad = grads[name][i].clone()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), h["clip"])
            assert float(norm) == pytest.approx(float(norms[i]), rel=1e-12)
            if active[i]:
                optimizer.step()
            for name, p in model.named_parameters():
                assert relative(pack.params[name][i], p.detach()) <= 1e-13, (step, i, name)


def test_a_diverging_model_stays_alone(compose, tmp_path, float64):
    """A learning rate of 1e300 makes model 1 diverge: it ends `diverged` at its solo run's step, and model 0 is its
    solo run to the last digit's tolerance."""
    cfgs = [compose(*TINY, "seed=0"), compose(*TINY, "seed=1", "trainer.lr=1e300")]
    solo = [run_job(cfg, tmp_path / f"solo{i}") for i, cfg in enumerate(cfgs)]
    assert solo[1]["status"] == "diverged"
    results = run_pack(cfgs, [tmp_path / "pack0", tmp_path / "pack1"])
    assert [r["status"] for r in results] == ["completed", "diverged"]
    assert results[1]["steps"] == solo[1]["steps"] and results[1]["error"] == solo[1]["error"]
    assert_same_run(tmp_path / "solo0", tmp_path / "pack0")
    assert all(math.isfinite(r["train/loss"]) for r in rows(tmp_path / "pack0") if "train/loss" in r)


def test_stopped_pack_checkpoints_every_model_and_resumes(compose, tmp_path, float64, monkeypatch):
    """SIGTERM in step 4: both models checkpoint and stop; the re-run with trainer.resume=true continues each from
    its checkpoint to the uninterrupted pack's weights; a completed model is then skipped."""
    import gdn_exp.pack as pack_module

    cfgs = [compose(*TINY, *member) for member in MEMBERS]
    dirs = [tmp_path / "a0", tmp_path / "a1"]
    run_pack(cfgs, [tmp_path / "whole0", tmp_path / "whole1"])
    real_loss, calls = pack_module.lm_loss, {"n": 0}

    def loss_then_signal(logits, labels, **kwargs):  # under vmap: called once per step for the whole pack
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(logits, labels, **kwargs)

    monkeypatch.setattr(pack_module, "lm_loss", loss_then_signal)
    stopped = run_pack(cfgs, dirs)
    monkeypatch.setattr(pack_module, "lm_loss", real_loss)
    StopRequest.signal = None
    assert [r["status"] for r in stopped] == ["stopped", "stopped"] and "SIGTERM" in stopped[0]["error"]
    assert all(torch.load(d / "checkpoints" / "latest.pt", weights_only=True)["counters"]["step"] == 4 for d in dirs)
    resumed = run_pack([compose(*TINY, *member, "trainer.resume=true") for member in MEMBERS], dirs)
    assert [r["status"] for r in resumed] == ["completed", "completed"]
    for i, d in enumerate(dirs):
        assert_same_run(tmp_path / f"whole{i}", d, stopped_at=4)
    again = run_pack(cfgs, dirs)
    assert all(r.get("skipped") for r in again)


def assert_pack_gradients_are_each_models(cfg, device, tolerance, autocast=None, length=20):
    """The pack's summed losses and gradients (ModelPack.loss_sums under vmap) against each model run alone."""
    from contextlib import nullcontext

    from gdn_exp.train.evaluate import lm_loss

    autocast = autocast or nullcontext
    torch.manual_seed(0)
    models = [LanguageModel(cfg, backend="triton").to(device) for _ in range(2)]
    pack = ModelPack(models)
    input_ids = torch.randint(cfg.vocab_size, (2, 2, length), device=device)
    labels = torch.randint(cfg.vocab_size, (2, 2, length), device=device)
    labels[:, :, :5] = -100
    with autocast():
        losses = pack.loss_sums(input_ids, None, labels)
    losses.sum().backward()
    for i, model in enumerate(models):
        with autocast():
            loss = lm_loss(model(input_ids[i]), labels[i], reduction="sum")
        loss.backward()
        assert float(losses[i].detach()) == pytest.approx(float(loss.detach()), rel=tolerance)
        for name, param in model.named_parameters():
            assert relative(pack.params[name].grad[i], param.grad) <= tolerance, name


@pytest.mark.interpreter
@pytest.mark.parametrize("use_delta", [True, False], ids=["gdn", "no_delta"])
def test_triton_ops_under_vmap_match_each_model(use_delta):
    """The Triton Functions' vmap rules (`ops.vmap`: the gated delta rule and SwiGLU as one launch over the models'
    sequences, the norms, short conv and loss per model) give each model's own loss and gradients."""
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, num_heads=2, head_dim=16, use_delta=use_delta)
    assert_pack_gradients_are_each_models(cfg, "cpu", 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("mixer", MIXERS)
def test_pack_on_the_gpu_in_bf16_matches_each_model(mixer):
    """Compiled kernels under bf16 autocast (which also runs the fused residual-add norm and the Triton loss): the
    pack's losses and gradients are each model's, to bf16's rounding."""
    from functools import partial

    switches = {"gdn": {}, "no_delta": {"use_delta": False}, "no_gate": {"use_gate": False},
                "attention": {"mixer": "attention"}, "hybrid": {"attention_every": 2}}[mixer]
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layers=2, num_heads=1, head_dim=128, **switches)
    assert_pack_gradients_are_each_models(cfg, "cuda", 2e-2, partial(torch.autocast, "cuda", dtype=torch.bfloat16),
                                          length=200)  # several chunks


@pytest.mark.interpreter
def test_norm_kernels_take_one_weight_per_model_under_vmap():
    """Under vmap the norms run one launch for all models, model m's rows with weight[m] (the kernels' model grid
    axis): outputs and gradients are the per-model calls'."""
    from gdn_exp.ops.gated_norm.kernel import triton_add_rms_norm, triton_gated_rms_norm

    torch.manual_seed(0)
    M, D = 3, 24
    x, other, weight = torch.randn(M, 2, 5, D), torch.randn(M, 2, 5, D), 1 + torch.randn(M, D)
    for fn in (lambda o, w, g: (triton_gated_rms_norm(o, w, g, 1e-6),),
               lambda o, w, d: triton_add_rms_norm(o, d, w, 1e-6, out_dtype=torch.float32)):
        inputs = [t.clone().requires_grad_() for t in (x, weight, other)]
        packed = torch.func.vmap(fn)(*inputs)
        sum(out.square().sum() for out in packed).backward()
        for m in range(M):
            solo = [t[m].clone().requires_grad_() for t in (x, weight, other)]
            outputs = fn(*solo)
            sum(out.square().sum() for out in outputs).backward()
            for out, out_packed in zip(outputs, packed):
                assert relative(out_packed[m], out) <= 1e-6
            for t, t_packed in zip(solo, inputs):
                assert relative(t_packed.grad[m], t.grad) <= 1e-5


@pytest.mark.interpreter
def test_short_conv_kernels_take_one_weight_per_model_under_vmap():
    """The short conv under vmap: one launch per kernel for all models, sequence b of the folded batch with the
    weight of its model; outputs and gradients are the per-model calls'."""
    from gdn_exp.ops.short_conv.kernel import triton_short_conv_silu

    torch.manual_seed(0)
    M, parts = 3, ((2, 8, True), (2, 8, True), (1, 8, False))
    x, weight = torch.randn(M, 2, 20, 40, requires_grad=True), torch.randn(M, 40, 4, requires_grad=True)
    packed = torch.func.vmap(lambda x, w: triton_short_conv_silu(x, w, parts))(x, weight)
    sum(out.square().sum() for out in packed).backward()
    for m in range(M):
        x_m, w_m = x[m].detach().clone().requires_grad_(), weight[m].detach().clone().requires_grad_()
        outputs = triton_short_conv_silu(x_m, w_m, parts)
        sum(out.square().sum() for out in outputs).backward()
        for out, out_packed in zip(outputs, packed):
            assert relative(out_packed[m], out) <= 1e-6
        assert relative(x.grad[m], x_m.grad) <= 1e-5 and relative(weight.grad[m], w_m.grad) <= 1e-5


@pytest.mark.interpreter
def test_loss_kernels_sum_each_model_under_vmap():
    """The Triton loss under vmap: one launch each way for all models, each model's rows summed on their own and
    scaled by that model's own upstream gradient in backward."""
    from gdn_exp.ops.cross_entropy.kernel import triton_cross_entropy

    torch.manual_seed(0)
    M = 3
    logits, labels = torch.randn(M, 10, 40, requires_grad=True), torch.randint(40, (M, 10))
    labels[:, :3] = -100
    upstream = torch.tensor([1.0, 0.5, 3.0])
    packed = torch.func.vmap(lambda x, y: triton_cross_entropy(x, y, reduction="sum"))(logits, labels)
    (packed * upstream).sum().backward()
    for m in range(M):
        x = logits[m].detach().clone().requires_grad_()
        loss = triton_cross_entropy(x, labels[m], reduction="sum")
        (loss * upstream[m]).backward()
        assert float(packed[m].detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
        assert relative(logits.grad[m], x.grad) <= 1e-6


def test_a_solo_run_resumes_from_a_packs_checkpoint(compose, tmp_path, float64):
    """A pack's latest.pt is a solo run's: a solo run resumed from it at step 3 ends where the solo run trained
    straight through to step 6 ends (optimizer moments, step counts and schedule included)."""
    common = [*TINY, "trainer.lr_decay_steps=6", "trainer.checkpoint_interval=3"]
    run_pack([compose(*common, *MEMBERS[1], "trainer.max_steps=3")], [tmp_path / "resumed"])
    resumed = run_job(compose(*common, *MEMBERS[1], "trainer.resume=true"), tmp_path / "resumed",
                      skip_completed=False)
    assert resumed["status"] == "completed" and resumed["resumed_from"]
    run_job(compose(*common, *MEMBERS[1]), tmp_path / "straight")
    a, b = (torch.load(tmp_path / d / "checkpoints" / "latest.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["counters"]["step"] == b["counters"]["step"] == 6
    for key, weight in a["model"].items():
        assert relative(b["model"][key], weight) <= TOLERANCE, key


@pytest.mark.gpu
def test_pack_trainer_on_the_gpu(compose, tmp_path):
    """The pack trainer on compiled kernels with its CUDA graph and bf16 autocast: both models complete, and their
    first losses are their solo runs' to bf16's rounding (later ones drift apart as any two bf16 runs do)."""
    cfgs = [compose(*TINY, "trainer.device=cuda", "trainer.max_steps=20", *member) for member in MEMBERS]
    results = run_pack(cfgs, [tmp_path / "pack0", tmp_path / "pack1"])
    assert [r["status"] for r in results] == ["completed", "completed"] and all(r["cuda_graph"] for r in results)
    for i, cfg in enumerate(cfgs):
        run_job(cfg, tmp_path / f"solo{i}")
        solo, pack = ({r["step"]: r["train/loss"] for r in rows(tmp_path / f"{kind}{i}") if "train/loss" in r}
                      for kind in ("solo", "pack"))
        assert solo.keys() == pack.keys()
        for step in (1, 2, 3):
            assert pack[step] == pytest.approx(solo[step], rel=2e-2), (i, step)


@pytest.mark.slow  # ~5 min on a loaded 2-core CPU: the interpreter runs every kernel of three runs
@pytest.mark.interpreter
def test_pack_trainer_on_the_triton_kernels(compose, tmp_path):
    """The pack trainer with kernel.backend=triton (the interpreter, float32): every fold rule in a real step;
    each model's logged losses and weights are its solo run's to float32's rounding."""
    cfgs = [compose(*TINY, "kernel.backend=triton", "trainer.max_steps=3", *member) for member in MEMBERS]
    results = run_pack(cfgs, [tmp_path / "pack0", tmp_path / "pack1"])
    assert [r["status"] for r in results] == ["completed", "completed"], results[0].get("traceback")
    for i, cfg in enumerate(cfgs):
        run_job(cfg, tmp_path / f"solo{i}")
        assert_same_run(tmp_path / f"solo{i}", tmp_path / f"pack{i}", tolerance=1e-4)
