"""Long-context evaluation: reading a sequence chunk by chunk through the cache scores it exactly like one full
forward; tasks grow with the evaluation length; the command writes its table, JSON and plot."""
import json

import pytest
import torch

import tasks
from gdn_exp.longcontext import chunked_accuracy, main, model_label
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.train import run_job
from gdn_exp.train.data import DeviceSplit
from gdn_exp.train.evaluate import evaluate


@pytest.mark.parametrize("mixers", [dict(mixer="gdn"), dict(mixer="attention"),
                                    dict(attention_every=2, attention_window=24)],
                         ids=["gdn", "attention", "hybrid-window"])
def test_chunked_evaluation_matches_full_forward(mixers):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=64, d_model=32, n_layers=2, num_heads=2, head_dim=16,
                                      **mixers), backend="torch").eval()
    batch = tasks.make_task("mqar", seed=3, num_examples=6, vocab_size=64, seq_len=100, num_kv_pairs=4)
    full = evaluate(model, DeviceSplit.from_split(batch, torch.device("cpu")), batch_size=6)
    chunked = chunked_accuracy(model, batch["input_ids"], batch["labels"], chunk_size=32, batch_size=4)
    assert chunked["accuracy"] == pytest.approx(full["test/accuracy"])
    assert chunked["exact_match"] == pytest.approx(full["test/exact_match"])


def test_tasks_grow_with_the_evaluation_length():
    assert tasks.at_length("copy", 128, vocab_size=16, seq_len=32, copy_len=16) == {
        "vocab_size": 16, "seq_len": 128, "copy_len": 64}
    assert tasks.at_length("reverse", 64, seq_len=32, copy_len=10)["copy_len"] == 20
    needle = tasks.at_length("needle", 4096, vocab_size=64, seq_len=64, num_needles=2, num_queries=1)
    assert needle["seq_len"] == 4096 and needle["num_needles"] == 2
    with pytest.raises(ValueError, match="'lm'"):
        tasks.at_length("lm", 128, seq_len=64)


def test_model_labels_name_the_mixer_and_ablations():
    assert model_label({"mixer": "gdn"}) == "gdn"
    assert model_label({"mixer": "attention"}) == "attention"
    assert model_label({"mixer": "gdn", "attention_every": 4, "attention_window": 64}) == \
        "gdn+attention/4 (window 64)"
    assert model_label({"mixer": "gdn", "use_gate": False}) == "gdn [use_gate=False]"
    assert model_label({"mixer": "gdn", "use_gate": False, "d_model": 64}) == "gdn [use_gate=False], d_model 64"


def test_command_writes_table_json_and_plot(compose, tmp_path):
    run = tmp_path / "run"
    run_job(compose("model=tiny", "task=needle", "task.seq_len=32", "task.num_train=256", "task.num_test=32",
                    "logger=none", "trainer.max_steps=4", "trainer.eval_interval=4", "trainer.num_threads=1"), run)
    main([str(run), "--factors", "1", "4", "16", "--max-length", "256", "--num-examples", "4",
          "--chunk-size", "48", "--out", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out/longcontext.json").read_text())
    assert [r["length"] for r in rows] == [32, 128]  # 16 x 32 = 512 is over --max-length
    assert all(0 <= r["accuracy"] <= 1 and r["label"] == "gdn, d_model 64" and r["train_length"] == 32 for r in rows)
    table = (tmp_path / "out/longcontext.md").read_text()
    assert "| needle | gdn, d_model 64 | 32 |" in table and "| 128 |" in table
    assert (tmp_path / "out/longcontext.png").stat().st_size > 10_000
    main([str(tmp_path / "out/longcontext.json"), "--out", str(tmp_path / "merged")])  # earlier rows, re-rendered
    assert (tmp_path / "merged/longcontext.md").read_text() == table


def test_runs_that_differ_in_width_stay_apart_and_calls_keep_their_outputs(compose, tmp_path, monkeypatch):
    base = ["model=tiny", "task=copy", "task.seq_len=16", "task.copy_len=4", "task.num_train=64", "task.num_test=16",
            "logger=none", "trainer.max_steps=2", "trainer.eval_interval=2", "trainer.num_threads=1"]
    for width in (32, 64):
        run_job(compose(*base, f"model.d_model={width}", "model.head_dim=16"), tmp_path / f"d{width}")
    monkeypatch.chdir(tmp_path)
    arguments = [str(tmp_path / "d32"), str(tmp_path / "d64"), "--factors", "1", "2", "--num-examples", "4"]
    main(arguments)
    (first,) = (tmp_path / "outputs/longcontext").iterdir()  # a directory of its own, named by the time
    table = (first / "longcontext.md").read_text()
    assert "gdn, d_model 32" in table and "gdn, d_model 64" in table and table.count("| copy |") == 2
    monkeypatch.setattr("gdn_exp.longcontext.datetime", type("Later", (), {"now": staticmethod(
        lambda: __import__("datetime").datetime(2099, 1, 1))}))
    main(arguments)
    assert len(list((tmp_path / "outputs/longcontext").iterdir())) == 2
