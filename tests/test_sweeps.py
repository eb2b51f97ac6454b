"""Sweeps through the real `gdn-exp -m` CLI: parallel jobs each in their own run dir, a broken grid point fails
alone, a re-run skips completed jobs (unless trainer.skip_completed=false), wandb runs of a sweep share a group,
and parallel jobs on a multi-GPU machine each claim a GPU of their own."""
import json
import subprocess
import sys
import threading
import time

from omegaconf import OmegaConf

from gdn_exp import cli, report
from wandb_files import wandb_records

# A copy task small enough that a job trains in about a second.
TINY = ["model=tiny", "task=copy", "task.num_train=64", "task.num_test=16", "task.copy_len=2", "trainer.max_steps=3",
        "trainer.eval_interval=3", "trainer.log_interval=1", "trainer.batch_size=4", "trainer.num_threads=1",
        "trainer.progress=false"]


def gdn_exp(tmp_path, *args):
    """Runs `gdn-exp` in a fresh process, with the task cache under tmp_path, and checks that it exits with 0."""
    command = [sys.executable, "-m", "gdn_exp.cli", *args, f"task_cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def job_results(sweep_dir):
    """{job dir name: (results.json dict, its modification time)} of every job in a sweep."""
    return {path.parent.name: (json.loads(path.read_text()), path.stat().st_mtime_ns)
            for path in sweep_dir.glob("*/results.json")}


def test_parallel_sweep_isolates_a_broken_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # seq_len=3 cannot hold copy_len=2 twice: the broken grid point, once per ablation setting
    gdn_exp(tmp_path, "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}", *TINY,
            "logger=none", "ablation=none,[no_conv,no_output_gate]", "task.seq_len=8,3")
    jobs = job_results(sweep_dir)
    assert sorted(name.split("_")[0] for name in jobs) == ["0", "1", "2", "3"]  # a run dir per job
    assert any("ablation=[no_conv,no_output_gate]" in name for name in jobs)
    for name, (results, _) in jobs.items():
        if "task.seq_len=3" in name:
            assert results["status"] == "failed" and results["user_error"], name
            assert "seq_len=3 is too small" in results["error"]
        else:
            assert results["status"] == "completed" and results["steps"] == 3, name
    runs = [report.load_run(run_dir) for run_dir in report.find_run_dirs([str(sweep_dir)])]
    table = report.markdown_table(runs, report.swept_keys(runs), "test/accuracy")
    assert table.count("| completed |") == 2 and table.count("| failed |") == 2


def test_rerun_skips_completed_jobs_unless_opted_out(tmp_path):
    """The first run logs to wandb (offline): its runs share the sweep's group. The re-runs log nowhere, which
    leaves the job dir names alone, so they find the first run's jobs."""
    sweep_dir = tmp_path / "2025-01-01_00-00-00-000000"
    sweep = ["-m", f"hydra.sweep.dir={sweep_dir}", *TINY, "task.seq_len=8,3"]
    gdn_exp(tmp_path, *sweep, "logger=wandb", "logger.mode=offline")
    first = job_results(sweep_dir)
    assert sorted(results["status"] for results, _ in first.values()) == ["completed", "failed"]
    run_file, = sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb")  # the completed job's wandb run
    assert [r.run.run_group for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"] == [
        sweep_dir.name]

    gdn_exp(tmp_path, *sweep, "logger=none")  # the same sweep again: the completed job is skipped
    second = job_results(sweep_dir)
    for name, (results, mtime) in second.items():
        assert (mtime == first[name][1]) == (results["status"] == "completed"), name

    gdn_exp(tmp_path, *sweep, "logger=none", "trainer.skip_completed=false")  # opted out: every job runs again
    third = job_results(sweep_dir)
    assert third.keys() == first.keys() and all(third[name][1] > second[name][1] for name in third)


def test_gpu_claims_are_exclusive_and_wait_for_a_free_gpu(tmp_path):
    with cli.claim_gpu(2, tmp_path) as first, cli.claim_gpu(2, tmp_path) as second:
        assert (first, second) == (0, 1)
        claimed = []

        def third_job():
            with cli.claim_gpu(2, tmp_path, poll_s=0.01) as index:
                claimed.append(index)

        waiting = threading.Thread(target=third_job)
        waiting.start()
        time.sleep(0.2)
        assert not claimed  # both GPUs are held: the third job waits
    waiting.join(timeout=5)
    assert claimed == [0]


def test_sweep_job_on_a_multi_gpu_machine_gets_its_own_device(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    monkeypatch.setattr(cli, "GPU_LOCK_DIR", tmp_path)
    jobs = [OmegaConf.create({"trainer": {"device": "auto"}}) for _ in range(3)]
    with cli.job_device(jobs[0], multirun=True), cli.job_device(jobs[1], multirun=True):
        assert [job.trainer.device for job in jobs[:2]] == ["cuda:0", "cuda:1"]
    with cli.job_device(jobs[2], multirun=False):  # a single run keeps trainer.device=auto
        assert jobs[2].trainer.device == "auto"
    pinned = OmegaConf.create({"trainer": {"device": "cuda:3"}})
    with cli.job_device(pinned, multirun=True):  # an explicit device is left alone
        assert pinned.trainer.device == "cuda:3"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with cli.job_device(jobs[2], multirun=True):  # under torchrun every rank uses its LOCAL_RANK's GPU
        assert jobs[2].trainer.device == "auto"
