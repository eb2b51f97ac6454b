"""Sweeps through the real `gdn-exp -m` CLI: parallel jobs each in their own run dir, a broken grid point fails
alone, a re-run skips completed jobs (unless trainer.skip_completed=false), wandb runs of a sweep share a group,
and parallel jobs on a multi-GPU machine each claim a GPU of their own."""
import json
import subprocess
import sys
import threading
import time

import pytest
from omegaconf import OmegaConf

from gdn_exp import cli, report

# A copy task small enough that a job trains in about a second.
TINY = ["model=tiny", "task=copy", "task.num_train=64", "task.num_test=16", "task.copy_len=2", "trainer.max_steps=3",
        "trainer.eval_interval=3", "trainer.log_interval=1", "trainer.batch_size=4", "trainer.num_threads=1",
        "trainer.progress=false"]


def gdn_exp(tmp_path, *args):
    """Runs `gdn-exp` in a fresh process with the task cache under tmp_path; returns the finished process."""
    command = [sys.executable, "-m", "gdn_exp.cli", *args, f"task_cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


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
    table = report.markdown_table(*table_of(sweep_dir))
    assert table.count("| completed |") == 2 and table.count("| failed |") == 2


def test_rerun_of_a_sweep_skips_completed_jobs_unless_opted_out(tmp_path):
    sweep = ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *TINY, "logger=none", "task.seq_len=8,3"]
    gdn_exp(tmp_path, *sweep)
    first = job_results(tmp_path / "sweep")
    assert sorted(results["status"] for results, _ in first.values()) == ["completed", "failed"]

    gdn_exp(tmp_path, *sweep)  # the same sweep again: the completed job is skipped, the broken one fails again
    second = job_results(tmp_path / "sweep")
    for name, (results, mtime) in second.items():
        assert (mtime == first[name][1]) == (results["status"] == "completed"), name

    gdn_exp(tmp_path, *sweep, "trainer.skip_completed=false")  # opted out: every job runs again
    third = job_results(tmp_path / "sweep")
    assert third.keys() == first.keys() and all(third[name][1] > second[name][1] for name in third)


def table_of(sweep_dir):
    runs = [report.load_run(run_dir) for run_dir in report.find_run_dirs([str(sweep_dir)])]
    return report.sort_runs(runs, report.swept_keys(runs)), report.swept_keys(runs), "test/accuracy"


def wandb_records(run_file) -> list:
    """The protobuf Records of an offline run-*.wandb file: a LevelDB-style log in 32 KiB blocks after a 7-byte
    header; each chunk has a 7-byte header (checksum, length, kind: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, partial = run_file.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(partial))
    return records


def test_wandb_runs_of_a_sweep_share_its_group(tmp_path):
    sweep_dir = tmp_path / "2025-01-01_00-00-00-000000"
    gdn_exp(tmp_path, "-m", f"hydra.sweep.dir={sweep_dir}", *TINY, "task.seq_len=8", "logger=wandb",
            "logger.mode=offline", "trainer.lr=1e-3,3e-3")
    run_files = sorted(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    for run_file in run_files:
        run_records = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
        assert run_records and all(run.run_group == sweep_dir.name for run in run_records)


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
