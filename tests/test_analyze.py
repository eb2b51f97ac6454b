"""gdn_exp.analyze: the implicit attention reproduces the op (delta rule and not, gated and not) and matches its
definition, the softmax map reproduces SDPA, the hooks record what the layers compute, and `gdn-exp-analyze`
draws a run and a sweep; the example script runs."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gdn_exp.nn.gated_deltanet as gated_deltanet_module
from gdn_exp import analyze
from gdn_exp.analyze import cli, maps
from gdn_exp.analyze.runs import recording
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.nn import Attention, GatedDeltaNet
from gdn_exp.ops.reference import recurrent_gated_delta_rule
from gdn_exp.train import run_job

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "look_inside.py"


def op_inputs(B, T, H, K, V, *, gated: bool, seed: int = 0):
    """Random op inputs in float64 as the layer makes them: unit k, g <= 0 (0 without a gate), beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = randn(B, T, H, K), F.normalize(randn(B, T, H, K), dim=-1), randn(B, T, H, V)
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) if gated else torch.zeros(B, T, H, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    return q, k, v, g, beta


@pytest.mark.parametrize("gated", [True, False], ids=["gate", "no_gate"])
@pytest.mark.parametrize("use_delta", [True, False], ids=["delta", "no_delta"])
def test_implicit_attention_reproduces_the_op(use_delta, gated):
    q, k, v, g, beta = op_inputs(2, 37, 3, 8, 6, gated=gated)
    scale = 8 ** -0.5
    A = maps.implicit_attention(q, k, g, beta, scale=scale, use_delta=use_delta)
    o, _ = recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, use_delta=use_delta)
    assert A.shape == (2, 3, 37, 37) and (A.triu(1) == 0).all()
    assert (maps.apply_attention(A, v) - o).abs().max() < 1e-10 * o.abs().max()


@pytest.mark.parametrize("use_delta", [True, False], ids=["delta", "no_delta"])
def test_implicit_attention_is_its_definition(use_delta):
    """Each entry against scale q_tᵀ (Π_{r=s+1..t} α_r (I − β_r k_r k_rᵀ)) β_s k_s, multiplied out (a map that
    reproduces o for one v need not be this one when T > V)."""
    q, k, v, g, beta = op_inputs(1, 7, 2, 4, 3, gated=True, seed=1)
    A = maps.implicit_attention(q, k, g, beta, scale=0.5, use_delta=use_delta)
    for h in range(2):
        for t in range(7):
            for s in range(t + 1):
                product = torch.eye(4, dtype=torch.float64)
                for r in range(s + 1, t + 1):
                    k_r = k[0, r, h]
                    erase = beta[0, r, h] * torch.outer(k_r, k_r) if use_delta else 0
                    product = g[0, r, h].exp() * (torch.eye(4, dtype=torch.float64) - erase) @ product
                expected = 0.5 * q[0, t, h] @ product @ (beta[0, s, h] * k[0, s, h])
                assert abs(A[0, h, t, s] - expected) < 1e-13


def test_states_read_out_the_op_and_statistics_are_per_step():
    q, k, v, g, beta = op_inputs(2, 20, 2, 5, 4, gated=True)
    for use_delta in (True, False):
        S = maps.gdn_states(k, v, g, beta, use_delta=use_delta)                # [B, T, H, K, V]
        o, _ = recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.3, use_delta=use_delta)
        torch.testing.assert_close(torch.einsum("bthk,bthkv->bthv", 0.3 * q, S), o, rtol=0, atol=1e-12)
        stats = maps.state_statistics(k, v, g, beta, use_delta=use_delta)
        assert all(x.shape == (2, 20, 2) for x in stats.values())
        torch.testing.assert_close(stats["norm"], torch.linalg.matrix_norm(S))
        assert stats["update"][:, 0].isnan().all() and (stats["effective_rank"][:, 0] - 1).abs().max() < 1e-9
        erased = stats["erased"][:, 1:]
        assert (erased == 0).all() if not use_delta else ((erased > 0) & (erased <= beta[:, 1:] + 1e-12)).all()


@pytest.mark.parametrize("window", [None, 5])
def test_softmax_map_is_causal_sums_to_one_and_reproduces_sdpa(window):
    torch.manual_seed(0)
    layer = Attention(32, 2, window=window).double()
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    records = []
    layer.record = records.append
    y, _ = layer(x)
    rec = records[0]
    A = maps.softmax_attention(rec["q"], rec["k"], scale=rec["scale"], window=rec["window"])   # [B, H, T, T]
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 2, 24, dtype=torch.float64))
    assert (A.triu(1) == 0).all()
    if window is not None:
        assert (A.tril(-window) == 0).all() and (A.diagonal(-window + 1, dim1=-2, dim2=-1) > 0).all()
    o = maps.apply_attention(A, rec["v"])                                     # [B, T, H, D]
    torch.testing.assert_close(layer.o_proj(o.reshape(2, 24, 32)), y, rtol=0, atol=1e-12)


def test_packed_documents_do_not_see_each_other():
    """With sequence_ids, each document's block of a map is the map of that document alone, and nothing else."""
    q, k, v, g, beta = op_inputs(1, 30, 2, 6, 4, gated=True)
    sequence_ids = (torch.arange(30) >= 11).long()[None] + (torch.arange(30) >= 19).long()[None]   # [1, T]
    packed = [maps.implicit_attention(q, k, g, beta, scale=0.4, sequence_ids=sequence_ids),
              maps.softmax_attention(q, k, scale=0.4, sequence_ids=sequence_ids)]
    for start, end in ((0, 11), (11, 19), (19, 30)):
        part = slice(start, end)
        alone = [maps.implicit_attention(q[:, part], k[:, part], g[:, part], beta[:, part], scale=0.4),
                 maps.softmax_attention(q[:, part], k[:, part], scale=0.4)]
        for A, A_alone in zip(packed, alone):
            torch.testing.assert_close(A[..., part, part], A_alone, rtol=0, atol=1e-14)
            assert (A[..., part, :start] == 0).all()
    statistics = maps.state_statistics(k, v, g, beta, sequence_ids=sequence_ids)
    assert statistics["update"][0, [0, 11, 19]].isnan().all()   # the state restarts at each document


@pytest.mark.parametrize("use_delta", [True, False], ids=["delta", "no_delta"])
def test_hook_records_the_op_inputs(monkeypatch, use_delta):
    """The map from the recorded inputs reproduces what the layer's op returned inside the forward pass."""
    outputs = []  # the op's o, as the layer got it

    def keeping_output(op):
        def op_and_keep(*args, **kwargs):
            o, state = op(*args, **kwargs)
            outputs.append(o)
            return o, state
        return op_and_keep

    for name in ("gated_delta_rule", "gated_linear_attention"):
        monkeypatch.setattr(gated_deltanet_module, name, keeping_output(getattr(gated_deltanet_module, name)))
    torch.manual_seed(0)
    layer = GatedDeltaNet(32, 2, 16, use_delta=use_delta).double()
    records = []
    layer.record = records.append
    layer(torch.randn(2, 20, 32, dtype=torch.float64))
    rec = records[0]
    A = maps.implicit_attention(rec["q"], rec["k"], rec["g"], rec["beta"], scale=rec["scale"], use_delta=use_delta)
    torch.testing.assert_close(maps.apply_attention(A, rec["v"]), outputs[0], rtol=0, atol=1e-12)


def test_trace_of_a_hybrid_model_removes_its_hooks():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=16, d_model=32, n_layers=2, num_heads=2, head_dim=16,
                                      attention_every=2)).double()
    with recording(model) as records:
        model(torch.randint(0, 16, (2, 12)))
    assert [sorted(r) for r in records] == [["beta", "g", "k", "q", "scale", "v"], ["k", "q", "scale", "v", "window"]]
    assert all(block.mixer.record is None for block in model.blocks)


def train(compose, run_dir, *overrides):
    results = run_job(compose("model=tiny", "logger=none", "trainer.max_steps=6", "trainer.eval_interval=3",
                              "trainer.num_threads=1", "task.num_train=128", "task.num_test=32", *overrides), run_dir)
    assert results["status"] == "completed"


def linked_images(index: Path) -> list:
    """The PNGs index.md links, each of which must exist."""
    text = index.read_text()
    names = [part.split(")")[0] for part in text.split("](")[1:] if part.split(")")[0].endswith(".png")]
    assert names and all((index.parent / name).is_file() for name in names), names
    return names


def test_command_draws_a_run_and_a_sweep(compose, tmp_path):
    mqar = ("task=mqar", "task.seq_len=32", "task.num_kv_pairs=4", "task.vocab_size=32")
    train(compose, tmp_path / "copy_run", "task=copy", "task.seq_len=16", "task.copy_len=8")
    sweep = tmp_path / "sweep"
    train(compose, sweep / "gdn", *mqar)
    train(compose, sweep / "no_delta", *mqar, "ablation=no_delta")
    train(compose, sweep / "hybrid", *mqar, "model.attention_every=2")
    (sweep / "failed").mkdir()
    (sweep / "failed" / "results.json").write_text(json.dumps({"status": "failed", "error": "boom"}))

    cli.main([str(tmp_path / "copy_run"), "--examples", "2", "--eval-examples", "16", "--threads", "1"])
    page = tmp_path / "copy_run" / "analysis" / "index.md"
    assert {"attention_example0.png", "attention_example1.png", "alignment.png", "profile.png", "state.png",
            "gates.png"} <= set(linked_images(page))
    assert "Every answer is 8 tokens after its source" in page.read_text()

    cli.main([str(sweep), "--out", str(tmp_path / "look"), "--examples", "2", "--eval-examples", "16"])
    top = tmp_path / "look" / "index.md"
    assert {"curves.png", "attention.png", "accuracy_by_distance.png", "gates.png"} <= set(linked_images(top))
    text = top.read_text()
    assert "3 runs analysed, 1 skipped" in text
    for name in ("gdn", "no_delta", "hybrid"):
        assert f"]({name}/index.md)" in text
        assert "accuracy_by_distance.png" in linked_images(tmp_path / "look" / name / "index.md")
    assert "| 1 | attention | 0 |" in (tmp_path / "look" / "hybrid" / "index.md").read_text()


def test_metrics_and_results_frames(compose, tmp_path):
    sweep = tmp_path / "sweep"
    for ablation in ("none", "no_gate"):
        train(compose, sweep / ablation, "task=copy", "task.seq_len=16", "task.copy_len=8", f"ablation={ablation}")
    results = analyze.results(sweep)
    assert sorted(results["run"]) == ["no_gate", "none"] and results["status"].eq("completed").all()
    metrics = analyze.metrics(sweep / "none")
    lines = (sweep / "none" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len(lines) and set(metrics["run"]) == {"none"}
    assert metrics["test/accuracy"].notna().sum() == sum("test/accuracy" in line for line in lines)
    assert set(analyze.metrics(sweep)["run"]) == {"none", "no_gate"}


def test_example_script_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("look_inside", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--fast", "--out", str(tmp_path)])
    assert linked_images(tmp_path / "analysis" / "index.md")
