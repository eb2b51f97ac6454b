"""The trainer: a short run learns and writes the run directory; its loss curve is a plain training loop's;
resume after a kill continues exactly; NaN stops the run as diverged and keeps the last good checkpoint; chunk and
recurrent modes agree."""
import json

from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

import gdn_exp.train.step as step_module
from gdn_exp.data import task_source
from gdn_exp.model import LanguageModel, ModelConfig
from gdn_exp.train import run_job
from gdn_exp.train.checkpoint import unfinished_runs
from gdn_exp.train.data import batch_indices
from gdn_exp.train.evaluate import reached_target
from gdn_exp.train.loop import StopRequest, lr_multiplier
from wandb_files import wandb_history

FAST = ["model=tiny", "task=copy", "task.num_train=512", "task.num_test=64", "logger=none",
        "trainer.batch_size=16", "trainer.eval_interval=10", "trainer.log_interval=5",
        "trainer.checkpoint_interval=10", "trainer.target_accuracy=null"]


def metrics_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in metrics_rows(run_dir) if "train/loss" in r}


def test_short_run_writes_run_directory(compose, tmp_path):
    cfg = compose(*FAST, "trainer.max_steps=20")
    results = run_job(cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["status"] == results["status"] == "completed"
    for key in ("test/accuracy", "test/exact_match", "num_params", "wall_time_s", "tokens_per_s"):
        assert key in saved, key
    assert saved["steps"] == 20 and saved["num_params"] > 0 and saved["tokens_per_s"] > 0
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in rows if "test/accuracy" in r] == [10, 20]
    for name in ("latest.pt", "best.pt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert "model" in state and state["config"]["model"]["name"] == "tiny"


def plain_loop_losses(cfg, device) -> dict:
    """{step: loss} of a plain training loop (nanoGPT's): the same data, batches, init, AdamW and schedule as
    the trainer's, but logits at every position, torch's cross-entropy, the optimizer's default form and a host
    read of the loss every step."""
    tc = cfg.trainer
    train = task_source(cfg.task.name).load(cfg)["train"]
    x, y = train["input_ids"].to(device), train["labels"].to(device)
    torch.manual_seed(cfg.seed)
    model = LanguageModel(ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))).to(device)
    optimizer = torch.optim.AdamW(model.param_groups(tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, warmup_steps=tc.warmup_steps, decay_steps=tc.max_steps, min_lr_ratio=tc.min_lr_ratio))
    losses = {}
    for step in range(tc.max_steps):
        idx = batch_indices(step, seed=cfg.seed, batch_size=tc.batch_size, num_examples=len(x)).to(device)
        logits = model(x[idx])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y[idx].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step + 1] = loss.item()
    return losses


EQUIVALENCE = [*FAST, "task=mqar", "task.seq_len=32", "task.num_kv_pairs=4", "trainer.log_interval=1",
               "trainer.max_steps=30", "trainer.warmup_steps=5", "trainer.eval_interval=15",
               "trainer.checkpoint_interval=15", "trainer.precision=fp32"]


def test_loss_curve_matches_a_plain_training_loop(compose, tmp_path):
    """The trainer's head at scored positions, device-resident batches and deferred loss reads change nothing."""
    cfg = compose(*EQUIVALENCE, "trainer.device=cpu")
    assert run_job(cfg, tmp_path / "run")["status"] == "completed"
    assert losses(tmp_path / "run") == pytest.approx(plain_loop_losses(cfg, torch.device("cpu")), rel=1e-5)


@pytest.mark.gpu
def test_cuda_graph_loss_curve_matches_a_plain_training_loop(compose, tmp_path):
    """The same on a GPU, with the step replayed from a CUDA graph (float32: the plain loop has no autocast)."""
    cfg = compose(*EQUIVALENCE, "trainer.device=cuda")
    results = run_job(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["cuda_graph"]
    assert losses(tmp_path / "run") == pytest.approx(plain_loop_losses(cfg, torch.device("cuda")), rel=1e-4)


def test_training_reduces_loss(compose, tmp_path):
    cfg = compose(*FAST, "trainer.max_steps=60", "task.copy_len=4", "task.seq_len=8")
    run_job(cfg, tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert curve[60] < 0.8 * curve[5], curve


def test_a_capped_run_is_a_prefix_of_the_uncapped_one(compose, tmp_path):
    """trainer.lr_decay_steps keeps the schedule of the full budget: capping max_steps only truncates the run."""
    schedule = ("trainer.warmup_steps=5", "trainer.min_lr_ratio=0.0")
    run_job(compose(*FAST, *schedule, "trainer.max_steps=40"), tmp_path / "full")
    run_job(compose(*FAST, *schedule, "trainer.max_steps=20", "trainer.lr_decay_steps=40"), tmp_path / "capped")
    full, capped = ([r for r in metrics_rows(tmp_path / name) if "train/lr" in r] for name in ("full", "capped"))
    assert [r["step"] for r in capped] == [5, 10, 15, 20]
    for name in ("train/lr", "train/loss"):
        assert [r[name] for r in full[:4]] == pytest.approx([r[name] for r in capped], rel=1e-6), name
    assert capped[-1]["train/lr"] > 0.5 * 3e-3  # halfway through the full cosine, not at its end


def test_resume_after_kill_matches_uninterrupted_run(compose, tmp_path, signal_during_step):
    run_job(compose(*FAST, "trainer.max_steps=40"), tmp_path / "full")

    disarm = signal_during_step(25)  # a real SIGTERM arrives during step 25
    killed = run_job(compose(*FAST, "trainer.max_steps=40"), tmp_path / "killed")
    assert killed["status"] == "stopped" and "SIGTERM" in killed["error"]
    assert torch.load(tmp_path / "killed/checkpoints/latest.pt", weights_only=True)["counters"]["step"] == 25
    disarm()
    StopRequest.signal = None  # the stopped process would have exited; this one goes on as a new one

    resumed = run_job(compose(*FAST, "trainer.max_steps=40", f"trainer.resume={tmp_path / 'killed'}"),
                      tmp_path / "resumed")
    full = json.loads((tmp_path / "full/results.json").read_text())
    assert resumed["status"] == "completed" and resumed["steps"] == 40
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)
    assert resumed["test/accuracy"] == pytest.approx(full["test/accuracy"])
    assert resumed["test/loss"] == pytest.approx(full["test/loss"], rel=1e-6)


def test_steps_to_target_is_the_first_evaluation_at_the_target_and_survives_a_resume(compose, tmp_path):
    never = run_job(compose(*FAST, "trainer.max_steps=10", "trainer.target_accuracy=1.0"), tmp_path / "never")
    assert never["steps"] == 10 and never["steps_to_target"] is None
    first = run_job(compose(*FAST, "trainer.max_steps=40", "trainer.target_accuracy=0.0"), tmp_path / "first")
    assert first["steps"] == 10 and first["steps_to_target"] == 10  # reached at the first evaluation: stops
    resumed = run_job(compose(*FAST, "trainer.max_steps=40", "trainer.target_accuracy=0.0",
                              f"trainer.resume={tmp_path / 'first'}"), tmp_path / "resumed")
    assert resumed["steps"] == 20 and resumed["steps_to_target"] == 10  # the resumed run's eval at 20 is later
    assert json.loads((tmp_path / "resumed/results.json").read_text())["steps_to_target"] == 10


def stopped_run(compose, signal_during_step, run_dir, *overrides):
    """A run of FAST (20 steps) that a SIGTERM during step 10 stops: unfinished, with a checkpoint at step 10."""
    disarm = signal_during_step(10)
    results = run_job(compose(*FAST, "trainer.max_steps=20", *overrides), run_dir)
    disarm()
    StopRequest.signal = None  # the stopped process would have exited; this one goes on as a new one
    assert results["status"] == "stopped" and "SIGTERM at step 10" in results["error"]
    return results


def test_resume_true_continues_only_an_unfinished_run_with_the_same_config(compose, tmp_path, signal_during_step):
    runs = tmp_path / "runs"
    run_job(compose(*FAST, "trainer.max_steps=10"), runs / "done")  # completed: never picked up
    stopped_run(compose, signal_during_step, runs / "stopped")
    config = lambda *overrides: OmegaConf.to_container(compose(*FAST, "trainer.max_steps=20", *overrides),
                                                       resolve=True)
    assert unfinished_runs(runs, config("seed=1")) == []  # a different seed is a different run
    assert unfinished_runs(runs, config("trainer.lr=1e-3")) == []  # so is a different learning rate
    assert unfinished_runs(runs, config("trainer.resume=true", "trainer.max_steps=30")) == [runs / "stopped"]
    same = run_job(compose(*FAST, "trainer.max_steps=20", "trainer.resume=true"), runs / "stopped")  # in place
    assert same["resumed_from"] == str(runs / "stopped/checkpoints/latest.pt") and same["steps"] == 20
    assert same["status"] == "completed" and unfinished_runs(runs, config()) == []


def test_resume_from_a_path_names_the_settings_that_differ(compose, tmp_path, signal_during_step):
    stopped_run(compose, signal_during_step, tmp_path / "stopped")
    results = run_job(compose(*FAST, "trainer.max_steps=20", "trainer.lr=1e-3", "trainer.warmup_steps=3",
                              f"trainer.resume={tmp_path / 'stopped'}"), tmp_path / "resumed")
    assert results["status"] == "failed" and results["user_error"]
    assert "trainer.lr: 0.003 -> 0.001" in results["error"] and "trainer.warmup_steps: 50 -> 3" in results["error"]
    longer = run_job(compose(*FAST, "trainer.max_steps=30", f"trainer.resume={tmp_path / 'stopped'}"),
                     tmp_path / "longer")  # more steps is a change a resume may make
    assert longer["status"] == "completed" and longer["steps"] == 30


def test_a_damaged_checkpoint_is_skipped_for_the_one_before_it(compose, tmp_path, signal_during_step, caplog):
    stopped_run(compose, signal_during_step, tmp_path / "stopped")
    checkpoints = tmp_path / "stopped/checkpoints"
    assert {p.name for p in checkpoints.iterdir()} >= {"latest.pt", "previous.pt", "best.pt"}
    (checkpoints / "latest.pt").write_bytes((checkpoints / "latest.pt").read_bytes()[:1000])  # truncated
    junk = tmp_path / "junk/checkpoints"
    junk.mkdir(parents=True)
    (junk / "latest.pt").write_bytes(b"not a checkpoint")  # a sibling's damaged file must not stop the search
    with caplog.at_level("WARNING"):
        assert unfinished_runs(tmp_path, OmegaConf.to_container(compose(*FAST, "trainer.max_steps=20"),
                                                                resolve=True)) == [tmp_path / "stopped"]
        resumed = run_job(compose(*FAST, "trainer.max_steps=20", "trainer.resume=true"), tmp_path / "stopped")
    assert resumed["status"] == "completed" and resumed["resumed_from"] == str(checkpoints / "previous.pt")
    assert any("skipping checkpoint" in r.message and "latest.pt" in r.message for r in caplog.records)


def test_nan_loss_stops_as_diverged_and_keeps_last_good_checkpoint(compose, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = step_module.lm_loss

    def nan_from_step_15(logits, labels, **kwargs):
        calls["n"] += 1
        loss = real_loss(logits, labels, **kwargs)
        return loss * float("nan") if calls["n"] > 15 else loss

    monkeypatch.setattr(step_module, "lm_loss", nan_from_step_15)
    results = run_job(compose(*FAST, "trainer.max_steps=40"), tmp_path / "run")
    assert results["status"] == "diverged" and "step 15" in results["error"]
    latest = torch.load(tmp_path / "run/checkpoints/latest.pt", weights_only=True)
    assert latest["counters"]["step"] == 10
    assert all(torch.isfinite(p).all() for p in latest["model"].values())


def test_chunk_and_recurrent_kernels_give_the_same_loss_curve(compose, tmp_path):
    for mode in ("chunk", "recurrent"):
        run_job(compose(*FAST, "trainer.max_steps=15", f"kernel={mode}"), tmp_path / mode)
    chunk, recurrent = losses(tmp_path / "chunk"), losses(tmp_path / "recurrent")
    assert chunk.keys() == recurrent.keys()
    assert list(recurrent.values()) == pytest.approx(list(chunk.values()), rel=1e-4)


def test_completed_job_is_skipped_on_rerun(compose, tmp_path):
    cfg = compose(*FAST, "trainer.max_steps=10")
    first = run_job(cfg, tmp_path / "run")
    again = run_job(cfg, tmp_path / "run")
    assert again["skipped"] and again["test/accuracy"] == first["test/accuracy"]
    assert not run_job(cfg, tmp_path / "run", skip_completed=False).get("skipped")


def test_wandb_offline_run_records_metrics(compose, tmp_path):
    cfg = compose(*FAST, "trainer.max_steps=10", "logger=wandb", "logger.mode=offline")
    assert run_job(cfg, tmp_path / "run")["status"] == "completed"
    runs = list((tmp_path / "run/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = wandb_history(runs[0])
    for row in metrics_rows(tmp_path / "run"):
        for key, value in row.items():
            if key != "step":
                assert history[row["step"]][key] == pytest.approx(value), (row["step"], key)


def test_crash_records_failed_and_closes_the_wandb_run(compose, tmp_path, monkeypatch):
    import wandb

    def crash(logits, labels, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(step_module, "lm_loss", crash)
    results = run_job(compose(*FAST, "trainer.max_steps=10", "logger=wandb"), tmp_path / "run")
    assert results["status"] == "failed" and not results["user_error"] and "boom" in results["error"]
    assert "RuntimeError" in json.loads((tmp_path / "run/results.json").read_text())["traceback"]
    assert wandb.run is None  # finished as failed, so the next job in this process starts its own run


def test_longer_test_lengths_are_evaluated_and_logged(compose, tmp_path):
    cfg = compose(*FAST, "task=parity", "task.seq_len=8", "task.min_len=2", "task.test_lengths=[16,32]",
                  "trainer.max_steps=10")
    run_job(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("test/accuracy", "test/accuracy@16", "test/accuracy@32", "test/exact_match@16"):
        assert 0 <= saved[key] <= 1, key
    assert saved["test/loss@32"] > 0
    evals = [row for row in metrics_rows(tmp_path / "run") if "test/accuracy" in row]
    assert [row["step"] for row in evals] == [10] and "test/accuracy@32" in evals[0]


def test_target_is_reached_only_at_every_test_length():
    assert reached_target({"test/accuracy": 1.0, "test/loss": 9.0}, 0.99)
    assert not reached_target({"test/accuracy": 1.0, "test/accuracy@256": 0.6, "test/loss@256": 0.1}, 0.99)
    assert reached_target({"test/accuracy": 0.995, "test/accuracy@256": 0.99}, 0.99)
    assert not reached_target({"test/accuracy": 0.9, "test/accuracy@256": 1.0}, 0.99)
