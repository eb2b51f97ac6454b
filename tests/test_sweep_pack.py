"""Packed sweeps (`hydra.launcher.pack_size`, gdn_exp/sweep_pack.py): which jobs share a pack; a packed sweep on
the CPU leaves the job dirs of the same sweep run unpacked; a pack killed with SIGKILL resumes every model."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from gdn_exp.sweep import Job
from gdn_exp.sweep_pack import PackJob, group_jobs
from test_sweeps import TINY, gdn_exp


def test_jobs_that_differ_only_in_shapeless_keys_share_a_pack(compose, tmp_path):
    variants = [["seed=0"], ["seed=1", "trainer.lr=1e-2"], ["trainer.weight_decay=0", "model.init_std=0.02"],
                ["model.d_model=32"], ["kernel.mode=recurrent"], ["seed=2", "trainer.warmup_steps=0"]]
    jobs = [Job(i, OmegaConf.to_yaml(compose(*TINY, "logger=none", *v)), str(tmp_path / str(i)), str(i), "g")
            for i, v in enumerate(variants)]
    units = group_jobs(jobs, pack_size=3)
    assert [[j.index for j in u.jobs] if isinstance(u, PackJob) else u.index for u in units] == [
        [0, 1, 2], 3, 4, 5]  # d_model changes shapes; the recurrent form is not packed; 5 is left over
    assert group_jobs(jobs, pack_size=1) == jobs
    with pytest.raises(ValueError, match="pack_size"):
        group_jobs(jobs, pack_size=0)


def job_dirs(sweep_dir) -> dict:
    """{job dir name: its files (relative paths, wandb's and Hydra's own aside)}."""
    return {d.name: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and ".hydra" not in p.parts)
            for d in sweep_dir.iterdir() if d.is_dir()}


def metrics(job_dir) -> list:
    return [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]


def test_packed_sweep_leaves_the_job_dirs_of_the_unpacked_sweep(tmp_path):
    grid = [*TINY, "task.seq_len=8", "logger=none", "seed=0,1", "trainer.lr=1e-3,1e-2"]
    gdn_exp(tmp_path, "-m", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path / 'solo'}", *grid)
    output = gdn_exp(tmp_path, "-m", "hydra/launcher=local", "hydra.launcher.pack_size=4",  # trained, not reused
                     f"hydra.sweep.dir={tmp_path / 'packed'}", "trainer.skip_completed=false", *grid)
    assert "4 jobs in 1 packs" in output and "sweep: 4 completed" in output
    solo, packed = job_dirs(tmp_path / "solo"), job_dirs(tmp_path / "packed")
    assert solo == packed and len(solo) == 4
    for name in solo:
        a, b = metrics(tmp_path / "solo" / name), metrics(tmp_path / "packed" / name)
        assert [sorted(r) for r in a] == [sorted(r) for r in b]
        for row_a, row_b in zip(a, b):  # float32: the batched kernels round differently
            for key in row_a:
                if not key.startswith("perf/"):
                    assert row_a[key] == pytest.approx(row_b[key], rel=1e-4, abs=1e-6), (name, row_a["step"], key)
        results = json.loads((tmp_path / "packed" / name / "results.json").read_text())
        assert results["status"] == "completed" and results["pack_size"] == 4


def test_a_killed_pack_resumes_every_model(tmp_path):
    """SIGKILL to the whole sweep (launcher and worker) once both models have a checkpoint; the re-run with
    trainer.resume=true continues each from its own latest.pt to max_steps."""
    sweep_dir = tmp_path / "sweep"
    long_jobs = [arg for arg in TINY if not arg.startswith(("trainer.max_steps", "trainer.eval_interval"))]
    sweep = ["-m", "hydra/launcher=local", "hydra.launcher.pack_size=2", f"hydra.sweep.dir={sweep_dir}", *long_jobs,
             "task.seq_len=8", "trainer.max_steps=300", "trainer.eval_interval=100", "trainer.checkpoint_interval=10",
             "logger=none", "seed=0,1", f"task_cache_dir={tmp_path / 'cache'}"]
    launcher = subprocess.Popen([sys.executable, "-m", "gdn_exp.cli", *sweep], cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while len(list(sweep_dir.glob("*/checkpoints/latest.pt"))) < 2:
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert not list(sweep_dir.glob("*/results.json"))
    gdn_exp(tmp_path, *sweep, "trainer.resume=true")
    for job_dir in (p.parent for p in sweep_dir.glob("*/results.json")):
        results = json.loads((job_dir / "results.json").read_text())
        assert results["status"] == "completed" and results["steps"] == 300 and results["resumed_from"]
        steps = [r["step"] for r in metrics(job_dir) if "train/loss" in r]
        assert steps == list(range(1, 301))  # the rows before the checkpoint kept, the rest continued
