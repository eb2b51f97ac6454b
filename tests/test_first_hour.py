"""What a newcomer meets first: a CPU thread count that survives other processes on the machine, re-run sweeps
that find the jobs they completed anywhere under outputs/, a sweep job's log that reads like a single run's, and
the small things around a run directory."""
import logging

import pytest

from gdn_exp.train import run_job
from gdn_exp.train import threads

FAST = ["model=tiny", "task=copy", "task.num_train=64", "task.num_test=16", "task.copy_len=2", "logger=none",
        "trainer.batch_size=4", "trainer.max_steps=2", "trainer.eval_interval=2", "trainer.log_interval=1"]


@pytest.mark.parametrize("cores, processes, expected", [(1, 1, 1), (2, 1, 1), (2, 2, 1), (8, 1, 4), (8, 2, 2),
                                                        (64, 1, 4), (16, 4, 2)])
def test_auto_threads_take_half_the_available_cores(monkeypatch, cores, processes, expected):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert threads.auto_threads(processes) == expected


def test_start_up_line_says_how_many_threads_and_why(compose, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level(logging.INFO, logger="gdn_exp"):
        assert run_job(compose(*FAST), tmp_path / "auto")["status"] == "completed"
        assert run_job(compose(*FAST, "trainer.num_threads=2"), tmp_path / "two")["status"] == "completed"
    lines = [r.getMessage() for r in caplog.records if "parameters" in r.getMessage()]
    assert lines[0].endswith(", 1 CPU thread (auto, 2 cores)") and lines[1].endswith(", 2 CPU threads"), lines


def test_sweep_workers_share_the_cores(monkeypatch):
    from omegaconf import OmegaConf

    from gdn_exp.sweep import Job, job_config

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    config = {"trainer": {"device": "auto", "progress": True, "num_threads": None}, "logger": {"name": "none"}}
    assert job_config(Job(0, OmegaConf.to_yaml(config), "unused", "a", "g"), "cpu", 2).trainer.num_threads == 2
    config["trainer"]["num_threads"] = 3  # a job that names its thread count keeps it
    assert job_config(Job(0, OmegaConf.to_yaml(config), "unused", "a", "g"), "cpu", 2).trainer.num_threads == 3
