"""Run records that cannot be turned against the user (issue 39): nothing loaded runs code (a planted DCP
pickle); a skipped or refused invocation changes nothing in the run dir; a stopped run continues in its own
directory and ends completed there; a running one is never continued by another process; every damaged file
(torn metrics.jsonl line, torn or null results.json, overwritten latest.pt, damaged best.pt, truncated task
cache) is named in one line and survived where a good copy exists."""
import io
import json
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_state_dict

import tasks
from gdn_exp import longcontext
from gdn_exp.train import checkpoint, run_job, write_results
from gdn_exp.train.checkpoint import find_resume, load_weights, unfinished_runs
from gdn_exp.train.loop import StopRequest
from test_run_dirs import TINY, wait_for
from test_train import FAST, metrics_rows, stopped_run


def config_of(compose, *overrides) -> dict:
    return OmegaConf.to_container(compose(*overrides), resolve=True)


def files_of(run_dir) -> dict:
    """{relative path: bytes} of every file in run_dir but its lock."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


class Planted:
    """A pickle that runs code when loaded: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_dcp_pickle_is_refused_and_a_real_one_loads(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    path = tmp_path / "latest.dcp"
    with pytest.warns(UserWarning):  # no process group: torch says it saves in one process
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    checkpoint.save(path / checkpoint.TRAIN_STATE, {"counters": {"step": 3}})

    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    with pytest.warns(UserWarning):
        assert checkpoint.load_latest(path, fresh, fresh_optimizer)["counters"]["step"] == 3
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1

    marker = tmp_path / "code-ran"
    (path / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ValueError, match="not checkpoint metadata"):
        checkpoint.load_latest(path, fresh, fresh_optimizer)
    with pytest.raises(pickle.UnpicklingError):  # a non-tensor value (lr, betas) must be plain data too
        checkpoint.SafePlanner().load_bytes(None, io.BytesIO(pickle.dumps(Planted(marker))))
    assert not marker.exists()


def test_an_overwritten_latest_pt_fails_its_checksum_and_previous_pt_resumes(compose, tmp_path, caplog):
    run_job(compose(*FAST, "trainer.max_steps=20"), tmp_path / "run")
    checkpoints = tmp_path / "run/checkpoints"
    data = bytearray((checkpoints / "latest.pt").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # same size, weights zeroed: torch.load would take it
    (checkpoints / "latest.pt").write_bytes(bytes(data))
    config = config_of(compose, *FAST, "trainer.max_steps=30", "trainer.resume=true")
    with caplog.at_level("WARNING"):
        assert find_resume(True, tmp_path / "run", config) == checkpoints / "previous.pt"
    assert any("latest.pt" in r.message and "sha256" in r.message for r in caplog.records)
    (checkpoints / "best.pt").write_bytes(b"damaged")  # analyze, export and longeval fall back to latest.pt,
    assert load_weights(tmp_path / "run")[0] == checkpoints / "previous.pt"  # here damaged too: previous.pt
    (checkpoints / "previous.pt").unlink()
    with pytest.raises(ValueError, match="no readable"):  # none left: one line
        longcontext.load_run(tmp_path / "run")
    with pytest.raises(ValueError, match="no checkpoint in .* loads"):  # never started over on top of them
        find_resume(True, tmp_path / "run", config)


def test_stop_and_resume_in_place_keep_the_uninterrupted_records(compose, tmp_path, signal_during_step):
    full = run_job(compose(*FAST, "trainer.max_steps=20"), tmp_path / "full")
    disarm = signal_during_step(7)  # between evaluations: the stopped run's last one is its own, not the curve's
    stopped = run_job(compose(*FAST, "trainer.max_steps=20"), tmp_path / "run")
    disarm()
    StopRequest.signal = None
    assert stopped["status"] == "stopped" and metrics_rows(tmp_path / "run")[-1]["step"] == 7
    with (tmp_path / "run/metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "train/lo')  # torn by a kill mid-write
    (tmp_path / "run/results.json").write_text('{"status": "sto')  # torn too
    resumed = run_job(compose(*FAST, "trainer.max_steps=20", "trainer.resume=true"), tmp_path / "run")
    assert resumed["status"] == "completed" and resumed["steps"] == 20
    assert resumed["wall_time_s"] > stopped["wall_time_s"]  # both segments
    rows, full_rows = metrics_rows(tmp_path / "run"), metrics_rows(tmp_path / "full")
    assert [sorted(row) for row in rows] == [sorted(row) for row in full_rows]  # no extra row at the stop step
    for row, full_row in zip(rows, full_rows):
        assert {k: v for k, v in row.items() if k != "perf/tokens_per_s"} == pytest.approx(
            {k: v for k, v in full_row.items() if k != "perf/tokens_per_s"}, rel=1e-6)
    assert resumed["test/loss"] == pytest.approx(full["test/loss"], rel=1e-6)


def test_refused_and_skipped_invocations_change_nothing(compose, tmp_path, signal_during_step):
    stopped_run(compose, signal_during_step, tmp_path / "run")
    before = files_of(tmp_path / "run")
    refusals = {  # the overrides -> what the one line says
        ("trainer.max_steps=20",): "add trainer.resume=true to continue it",  # never restarted from step 0
        ("trainer.max_steps=20", "trainer.resume=true", "trainer.lr=1e-3"): "trainer.lr: 0.003 -> 0.001",
        ("trainer.max_steps=5", "trainer.resume=true"): "at step 10, past trainer.max_steps=5",
        ("trainer.max_steps=20", f"trainer.resume={tmp_path / 'run/checkpoints/best.pt'}"): "only the model's weights",
    }
    for overrides, message in refusals.items():
        results = run_job(compose(*FAST, *overrides), tmp_path / "run")
        assert results["refused"] and results["user_error"] and message in results["error"], results
        assert files_of(tmp_path / "run") == before, overrides

    assert run_job(compose(*FAST, "trainer.max_steps=20", "trainer.resume=true"), tmp_path / "run")["steps"] == 20
    done = files_of(tmp_path / "run")
    assert run_job(compose(*FAST, "trainer.max_steps=20", "seed=1"), tmp_path / "run")["skipped"]
    assert run_job(compose(*FAST, "trainer.max_steps=30"), tmp_path / "run")["skipped"]  # longer: needs resume
    assert files_of(tmp_path / "run") == done
    longer = run_job(compose(*FAST, "trainer.max_steps=30", "trainer.resume=true"), tmp_path / "run")
    assert longer["status"] == "completed" and longer["steps"] == 30 and not longer.get("skipped")


def test_damaged_results_are_named_and_survived(compose, tmp_path, signal_during_step, monkeypatch, caplog):
    stopped_run(compose, signal_during_step, tmp_path / "runs/stopped")
    (tmp_path / "runs/other/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/other/results.json").write_text("null")
    with caplog.at_level("WARNING"):
        assert unfinished_runs(tmp_path / "runs", config_of(compose, *FAST, "trainer.max_steps=20")) == \
            [tmp_path / "runs/stopped"]
    assert any("other/results.json" in r.message for r in caplog.records)

    before = (tmp_path / "runs/stopped/results.json").read_text()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", disk_full)
    write_results(tmp_path / "runs/stopped", {"status": "completed"})  # one log line, no traceback
    monkeypatch.undo()
    assert (tmp_path / "runs/stopped/results.json").read_text() == before


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(compose, tmp_path, monkeypatch):
    def full(state, path):
        open(path, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")  # torch's writer on a full disk

    monkeypatch.setattr(torch, "save", full)
    results = run_job(compose(*FAST, "trainer.max_steps=10"), tmp_path / "run")
    assert results["user_error"] and "cannot write" in results["error"] and "\n" not in results["error"]
    assert json.loads((tmp_path / "run/results.json").read_text())["status"] == "failed"
    assert [p.name for p in (tmp_path / "run").rglob("*.tmp")] == []


def test_a_truncated_task_cache_entry_is_named_and_made_again(tmp_path, caplog):
    split = lambda: tasks.load_split("copy", split="train", seed=0, num_examples=32, cache_dir=str(tmp_path))
    first = split()
    (arrow,) = tmp_path.rglob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        again = split()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any("does not read" in r.message and str(arrow.parent) in r.message for r in caplog.records)


def test_an_unwritable_task_cache_is_one_line(compose, tmp_path):
    (tmp_path / "a_file").write_text("")
    results = run_job(compose(*FAST, "trainer.max_steps=1", f"task_cache_dir={tmp_path / 'a_file/cache'}"),
                      tmp_path / "run")
    assert results["user_error"] and "\n" not in results["error"]
    assert f"cannot write the cache entry {tmp_path / 'a_file/cache'}" in results["error"]


def cli(tmp_path, *args, wait=True):
    flags, overrides = [a for a in args if a.startswith("-")], [a for a in args if not a.startswith("-")]
    process = subprocess.Popen([sys.executable, "-m", "gdn_exp.cli", *flags, *TINY,
                                f"task_cache_dir={tmp_path / 'cache'}", "trainer.log_interval=1",
                                "trainer.eval_interval=100", *overrides], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=300)
    return process.returncode, output


def test_a_stopped_run_continues_in_its_own_directory_and_never_one_in_use(tmp_path):
    first = cli(tmp_path, "trainer.max_steps=400", wait=False)
    runs = tmp_path / "outputs/runs"
    wait_for(runs)
    (run_dir,) = [d for d in runs.iterdir() if not d.is_symlink()]  # outputs/runs/latest aside
    wait_for(run_dir / "metrics.jsonl")
    busy_code, busy = cli(tmp_path, "trainer.max_steps=1", "trainer.resume=true")  # `first` is training it
    assert busy_code == 0 and f"not continuing {run_dir.relative_to(tmp_path)}" in busy and "in use" in busy
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    stopped = json.loads((run_dir / "results.json").read_text())
    assert first.returncode == 1 and stopped["status"] == "stopped"

    before = files_of(run_dir)
    code, output = cli(tmp_path, "trainer.max_steps=400", f"trainer.resume='{run_dir}'", "trainer.lr=1e-3")
    assert code == 1 and "trainer.lr: 0.003 -> 0.001" in output
    assert files_of(run_dir) == before  # Hydra's .hydra/ files too
    code, output = cli(tmp_path, "trainer.max_steps=400", "trainer.resume=true")
    assert code == 0 and f"continuing {run_dir.relative_to(tmp_path)} in place" in output
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["steps"] == 400
    assert len([d for d in runs.iterdir() if not d.is_symlink()]) == 2  # the stopped run and the 1-step one, no fork


def test_a_sweep_worker_whose_launcher_is_killed_checkpoints_and_stops(tmp_path):
    sweep_dir = tmp_path / "sweep"
    launcher = subprocess.Popen([sys.executable, "-m", "gdn_exp.cli", "-m", "hydra/launcher=local",
                                 f"hydra.sweep.dir={sweep_dir}", *TINY, f"task_cache_dir={tmp_path / 'cache'}",
                                 "trainer.max_steps=100000", "trainer.log_interval=1", "seed=0"],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sweep_dir)
    deadline = time.time() + 120
    while not list(sweep_dir.glob("*/metrics.jsonl")):  # the job is training
        assert time.time() < deadline
        time.sleep(0.1)
    (job,) = [p.parent for p in sweep_dir.glob("*/metrics.jsonl")]
    launcher.kill()
    launcher.wait()
    wait_for(job / "results.json", timeout=30)
    results = json.loads((job / "results.json").read_text())
    assert results["status"] == "stopped" and "the launcher's exit" in results["error"]
    assert torch.load(job / "checkpoints/latest.pt", weights_only=True)["counters"]["step"] == results["steps"]


def test_sweep_launcher_mistakes_and_failures_exit_non_zero(tmp_path):
    code, output = cli(tmp_path, "-m", f"hydra.sweep.dir={tmp_path / 'a'}", "hydra.launcher.n_jobs=0")
    assert code == 1 and "n_jobs=0 must be >= 1" in output and "Traceback" not in output, output
    assert not list((tmp_path / "a").glob("*/.hydra"))  # no job was set up
    code, output = cli(tmp_path, "-m", f"hydra.sweep.dir={tmp_path / 'b'}", "hydra/launcher=basic",
                       "model.num_heads=0")
    assert code == 1 and "1 job(s) did not complete" in output and "Traceback" not in output, output


def test_ctrl_c_before_training_is_one_line(tmp_path):
    run = cli(tmp_path, f"hydra.run.dir={tmp_path / 'run'}", "task.num_train=20000", wait=False)
    wait_for(tmp_path / "run/.hydra/overrides.yaml")  # the job has started: it makes its data and model
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 130 and "interrupted before training started" in output, output
    assert "Traceback" not in output
