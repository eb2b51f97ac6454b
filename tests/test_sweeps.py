"""Sweeps through the real `gdn-exp -m` CLI: parallel jobs each in their own run dir, a broken grid point fails
alone and the sweep says so (summary, exit code 1), a re-run skips completed jobs (unless
trainer.skip_completed=false), wandb runs of a sweep share a group; the local launcher's workers (jobs per GPU on
a simulated multi-GPU machine, a worker that dies), and a SIGTERM that stops the whole sweep."""
import json
import os
import signal
import subprocess
import sys
import time

from omegaconf import OmegaConf

from gdn_exp import report
from gdn_exp.sweep import Job, job_config, plan_workers, run_jobs, summary
from wandb_files import wandb_records

# A copy task small enough that a job trains in about a second.
TINY = ["model=tiny", "task=copy", "task.num_train=64", "task.num_test=16", "task.copy_len=2", "trainer.max_steps=3",
        "trainer.eval_interval=3", "trainer.log_interval=1", "trainer.batch_size=4", "trainer.num_threads=1",
        "trainer.progress=false"]


def gdn_exp(tmp_path, *args, returncode=0):
    """Runs `gdn-exp` in a fresh process, with the task cache under tmp_path, checks its exit code; returns its
    output."""
    command = [sys.executable, "-m", "gdn_exp.cli", *args, f"task_cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == returncode, done.stdout + done.stderr
    return done.stdout + done.stderr


def job_results(sweep_dir):
    """{job dir name: (results.json dict, its modification time)} of every job in a sweep."""
    return {path.parent.name: (json.loads(path.read_text()), path.stat().st_mtime_ns)
            for path in sweep_dir.glob("*/results.json")}


def test_parallel_sweep_isolates_a_broken_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # seq_len=3 cannot hold copy_len=2 twice: the broken grid point, once per ablation setting
    output = gdn_exp(tmp_path, "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}",
                     *TINY, "logger=none", "ablation=none,[no_conv,no_output_gate]", "task.seq_len=8,3", returncode=1)
    assert "sweep: 2 completed, 2 failed" in output
    jobs = job_results(sweep_dir)
    assert len(jobs) == 4  # a run dir per job, named by its overrides in a shell-safe form
    assert any("ablation=-no_conv,no_output_gate-" in name for name in jobs)
    for name, (results, _) in jobs.items():
        if "task.seq_len=3" in (sweep_dir / name / ".hydra/overrides.yaml").read_text():  # names are cut at 60
            assert results["status"] == "failed" and results["user_error"], name
            assert "seq_len=3 is too small" in results["error"]
        else:
            assert results["status"] == "completed" and results["steps"] == 3, name
    runs = [report.load_run(run_dir) for run_dir in report.find_run_dirs([str(sweep_dir)])]
    table = report.runs_table(runs, report.swept_keys(runs), "test/accuracy")
    assert table.count("| completed |") == 2 and table.count("| failed |") == 2


def test_rerun_skips_completed_jobs_unless_opted_out(tmp_path):
    """The first run logs to wandb (offline): its runs share the sweep's group. The re-runs log nowhere, which
    leaves the job dir names alone, so they find the first run's jobs."""
    sweep_dir = tmp_path / "2025-01-01_00-00-00-000000"
    sweep = ["-m", f"hydra.sweep.dir={sweep_dir}", *TINY, "task.seq_len=8,3"]
    gdn_exp(tmp_path, *sweep, "logger=wandb", "logger.mode=offline", returncode=1)  # a job failed
    first = job_results(sweep_dir)
    assert sorted(results["status"] for results, _ in first.values()) == ["completed", "failed"]
    run_file, = sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb")  # the completed job's wandb run
    assert [r.run.run_group for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"] == [
        sweep_dir.name]

    records = {p: p.read_bytes() for p in sweep_dir.glob("*/.hydra/*.yaml")}
    gdn_exp(tmp_path, *sweep, "logger=none", returncode=1)  # the same sweep again: the completed job is skipped
    second = job_results(sweep_dir)
    for name, (results, mtime) in second.items():
        assert (mtime == first[name][1]) == (results["status"] == "completed"), name
        if results["status"] == "completed":  # its records still say what ran there (logger=wandb)
            assert all(p.read_bytes() == data for p, data in records.items() if p.parent.parent.name == name)

    gdn_exp(tmp_path, *sweep, "logger=none", "trainer.skip_completed=false", returncode=1)  # every job runs again
    third = job_results(sweep_dir)
    assert third.keys() == first.keys() and all(third[name][1] > second[name][1] for name in third)

    grown = ["-m", f"hydra.sweep.dir={sweep_dir}", *TINY, "task.seq_len=8,3,16"]  # one value more on an axis
    gdn_exp(tmp_path, *grown, "logger=none", returncode=1)
    fourth = job_results(sweep_dir)
    assert len(fourth) == 3 and all(fourth[name][1] == third[name][1] for name in third
                                    if third[name][0]["status"] == "completed")


def test_workers_fill_every_gpu_and_jobs_run_on_their_workers_gpu():
    assert plan_workers(num_gpus=4, jobs_per_gpu=2, n_jobs=2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1",
                                                                  "cuda:2", "cuda:2", "cuda:3", "cuda:3"]
    assert plan_workers(num_gpus=0, jobs_per_gpu=8, n_jobs=3) == ["cpu"] * 3
    config = {"trainer": {"device": "auto", "progress": True}, "logger": {"name": "wandb", "group": None}}
    job = Job(index=0, config_yaml=OmegaConf.to_yaml(config), run_dir="unused", name="a", group="sweep-1")
    cfg = job_config(job, "cuda:3")
    assert (cfg.trainer.device, cfg.trainer.progress, cfg.logger.group) == ("cuda:3", False, "sweep-1")
    config["trainer"]["device"] = "cuda:1"  # a job that names its device keeps it
    assert job_config(Job(0, OmegaConf.to_yaml(config), "unused", "a", "g"), "cuda:3").trainer.device == "cuda:1"


class DiesInItsWorker(Job):
    """A job whose worker process dies (exit code 7) as soon as it reads the job's config."""

    @property
    def config_yaml(self):
        os._exit(7)

    @config_yaml.setter
    def config_yaml(self, value):
        pass


def test_a_dead_worker_fails_its_job_and_the_others_still_run(compose, tmp_path):
    cfg = compose(*TINY, "task.seq_len=8", "logger=none", f"task_cache_dir={tmp_path / 'cache'}")
    jobs = [Job(i, OmegaConf.to_yaml(cfg), str(tmp_path / f"job{i}"), f"job{i}", "g") for i in (0, 2)]
    jobs.insert(1, DiesInItsWorker(1, "", str(tmp_path / "job1"), "job1", "g"))
    results = run_jobs(jobs, plan_workers(num_gpus=0, jobs_per_gpu=1, n_jobs=1))
    assert [results[i]["status"] for i in (0, 1, 2)] == ["completed", "failed", "completed"]
    assert "exit code 7" in results[1]["error"]
    assert json.loads((tmp_path / "job1/results.json").read_text())["status"] == "failed"
    text, code = summary(jobs, results)
    assert code == 1 and text.startswith("sweep: 2 completed, 1 failed") and str(tmp_path / "job1") in text


def test_sigterm_stops_the_whole_sweep_and_says_what_to_rerun(tmp_path):
    sweep_dir = tmp_path / "sweep"
    long_jobs = [arg for arg in TINY if not arg.startswith(("trainer.max_steps", "trainer.eval_interval"))]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gdn_exp.cli", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=1",
         f"hydra.sweep.dir={sweep_dir}", *long_jobs, "task.seq_len=8", "trainer.max_steps=100000",
         "trainer.eval_interval=100000", "logger=none", "seed=0,1,2", f"task_cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(sweep_dir.glob("*/metrics.jsonl")):  # the first job is training
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, output
    assert "sweep: 1 stopped, 2 not started" in output and "trainer.resume=true" in output
    (stopped,) = [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")]
    assert stopped["status"] == "stopped" and "stopped by SIGTERM" in stopped["error"]
    assert list(sweep_dir.glob("*/checkpoints/latest.pt"))
