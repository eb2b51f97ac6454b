"""torchrun on CPU (gloo): two processes at the same global batch follow one process's loss curve, a job
leaves exactly one run directory, and an FSDP run stopped mid-way resumes exactly on a different number of ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gdn_exp.train import run_job

TINY = ["model=tiny", "task=copy", "task.num_train=512", "task.num_test=64", "logger=none",
        "trainer.batch_size=16", "trainer.eval_interval=10", "trainer.log_interval=5",
        "trainer.checkpoint_interval=10", "trainer.target_accuracy=null", "trainer.max_steps=20",
        "trainer.num_threads=1"]

# Runs the CLI with a SIGTERM to rank 0 alone during training step STOP_STEP; the other rank must stop with it.
STOP_ON_RANK_0 = """
import os, signal
import gdn_exp.train.step as step
from gdn_exp.cli import main

real_loss, calls = step.lm_loss, [0]

def loss_then_sigterm(logits, labels, **kwargs):
    calls[0] += 1
    if calls[0] == STOP_STEP and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGTERM)
    return real_loss(logits, labels, **kwargs)

step.lm_loss = loss_then_sigterm
main()
"""


def torchrun(tmp_path, nproc, *overrides, script=None):
    """Runs gdn-exp (or `script`) under torchrun in tmp_path; returns the finished process."""
    target = [str(script)] if script else ["-m", "gdn_exp.cli"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *target, *TINY, f"task_cache_dir={tmp_path / 'cache'}", "trainer.progress=false", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_two_ranks_follow_one_process_and_leave_one_run_dir(compose, tmp_path):
    single = run_job(compose(*TINY), tmp_path / "single")
    done = torchrun(tmp_path, 2, "trainer.grad_accum_steps=2")  # 2 ranks x 2 micro-batches of 4
    assert done.returncode == 0, done.stderr[-3000:]
    run_dirs = [p for p in (tmp_path / "outputs" / "runs").iterdir() if not p.is_symlink()]  # latest aside
    assert len(run_dirs) == 1, run_dirs  # rank 1's own Hydra dir is gone
    ddp = json.loads((run_dirs[0] / "results.json").read_text())
    assert ddp["status"] == "completed" and ddp["world_size"] == 2 and ddp["strategy"] == "ddp"
    assert losses(run_dirs[0]) == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert ddp["test/loss"] == pytest.approx(single["test/loss"], rel=1e-5)
    latest = torch.load(run_dirs[0] / "checkpoints" / "latest.pt", weights_only=True)
    assert latest["counters"]["step"] == 20 and not any(k.startswith("module.") for k in latest["model"])


def test_fsdp_run_stopped_on_two_ranks_resumes_exactly_on_one(compose, tmp_path):
    single = run_job(compose(*TINY), tmp_path / "single")
    script = tmp_path / "stop_on_rank_0.py"
    script.write_text(STOP_ON_RANK_0.replace("STOP_STEP", "12"))
    stopped = torchrun(tmp_path, 2, "hydra.run.dir=stopped", "trainer.strategy=fsdp",
                       "trainer.activation_checkpointing=true", script=script)
    assert stopped.returncode != 0
    results = json.loads((tmp_path / "stopped/results.json").read_text())
    assert results["status"] == "stopped" and "SIGTERM at step 12" in results["error"]
    train_state = torch.load(tmp_path / "stopped/checkpoints/latest.dcp/train_state.pt", weights_only=True)
    assert train_state["counters"]["step"] == 12

    resumed = run_job(compose(*TINY, "trainer.strategy=fsdp", f"trainer.resume={tmp_path / 'stopped'}"),
                      tmp_path / "resumed")
    assert resumed["status"] == "completed" and resumed["steps"] == 20 and resumed["world_size"] == 1
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert resumed["test/loss"] == pytest.approx(single["test/loss"], rel=1e-5)


def test_batch_that_does_not_split_is_a_user_error(compose, tmp_path):
    results = run_job(compose(*TINY, "trainer.batch_size=15", "trainer.grad_accum_steps=2"), tmp_path / "run")
    assert results["user_error"] and "trainer.batch_size=15" in results["error"]
