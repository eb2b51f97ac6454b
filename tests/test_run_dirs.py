"""Runs never share a directory and stop cleanly: a second process that targets a run directory in use refuses
with one line and changes nothing there; SIGUSR2 (a cluster's warning before its time limit) checkpoints and
stops like SIGTERM, and a handler that was there before (submitit's requeue) runs after the checkpoint; a run
writes its resolved config beside Hydra's."""
import json
import signal
import subprocess
import sys
import time

import torch
import yaml

from gdn_exp.train import run_job
from gdn_exp.train.loop import StopRequest

TINY = ["model=tiny", "task=copy", "task.num_train=256", "task.num_test=32", "logger=none", "trainer.batch_size=8",
        "trainer.num_threads=1", "trainer.progress=false"]


def start_cli(tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "gdn_exp.cli", *TINY, f"task_cache_dir={tmp_path / 'cache'}",
                             *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path, timeout=60):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_a_second_process_in_a_run_directory_refuses_and_leaves_it_alone(tmp_path):
    run_dir = tmp_path / "run"
    first = start_cli(tmp_path, f"hydra.run.dir={run_dir}", "trainer.max_steps=400", "seed=0")
    wait_for(run_dir / "metrics.jsonl")
    second = start_cli(tmp_path, f"hydra.run.dir={run_dir}", "trainer.max_steps=400", "seed=1")
    output, _ = second.communicate(timeout=120)
    assert second.returncode == 1
    assert [line for line in output.splitlines() if "error" in line] == [
        next(line for line in output.splitlines() if f"run directory {run_dir} is in use by" in line)]
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    for config in (run_dir / ".hydra/config.yaml", run_dir / "config.yaml"):
        assert yaml.safe_load(config.read_text())["seed"] == 0, config
    assert [tmp.name for tmp in (run_dir / "checkpoints").iterdir() if tmp.suffix == ".tmp"] == []


def test_sigusr2_checkpoints_and_stops_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run = start_cli(tmp_path, f"hydra.run.dir={run_dir}", "trainer.max_steps=100000", "trainer.log_interval=1",
                    "trainer.checkpoint_interval=100000", "trainer.eval_interval=100000")
    wait_for(run_dir / "metrics.jsonl")
    run.send_signal(signal.SIGUSR2)
    run.communicate(timeout=120)
    results = json.loads((run_dir / "results.json").read_text())
    assert run.returncode == 1 and results["status"] == "stopped" and "stopped by SIGUSR2" in results["error"]
    saved = torch.load(run_dir / "checkpoints/latest.pt", weights_only=True)["counters"]["step"]
    assert saved == results["steps"] > 0


def test_a_handler_that_was_there_before_runs_after_the_checkpoint(compose, tmp_path, signal_during_step):
    """As submitit's SIGUSR2 handler (requeue) must, when a cluster job reaches its time limit."""
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(
        (signum, (tmp_path / "run/checkpoints/latest.pt").is_file())))
    signal_during_step(3, signal.SIGUSR2)
    try:
        results = run_job(compose(*TINY, "trainer.max_steps=50"), tmp_path / "run")
    finally:
        signal.signal(signal.SIGUSR2, previous)
        StopRequest.signal = None
    assert "stopped by SIGUSR2 at step 3" in results["error"]
    assert seen == [(signal.SIGUSR2, True)]  # once, and the checkpoint was already there


def test_a_run_writes_its_resolved_config(compose, tmp_path):
    run_job(compose(*TINY, "trainer.max_steps=2"), tmp_path / "run")
    config = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert config["model"]["vocab_size"] == config["task"]["vocab_size"]  # ${task.vocab_size} resolved
    assert config["trainer"]["max_steps"] == 2


def test_divergence_exits_non_zero_with_one_line_and_strict_json(tmp_path):
    run_dir = tmp_path / "run"
    run = start_cli(tmp_path, f"hydra.run.dir={run_dir}", "trainer.max_steps=50", "trainer.lr=1e6",
                    "trainer.warmup_steps=0")
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 1, output
    (line,) = [line for line in output.splitlines() if "diverged" in line]
    assert "became nan at step" in line or "became inf at step" in line

    def refuse(constant):
        raise ValueError(f"results.json holds {constant}, which is not JSON")

    results = json.loads((run_dir / "results.json").read_text(), parse_constant=refuse)
    assert results["status"] == "diverged" and results["train/loss"] is None
    best = run_dir / "checkpoints/best.pt"
    if best.exists():  # only ever from an evaluation whose loss was finite
        assert torch.isfinite(torch.tensor(torch.load(best, weights_only=True)["metrics"]["test/loss"]))
