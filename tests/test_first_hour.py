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


def test_rerun_sweep_in_a_new_directory_reuses_what_completed(tmp_path):
    """The same `gdn-exp -m ...` twice, its directory not pinned: the second finds the first's completed job under
    outputs/ and links it instead of training it; the failed one runs again; skip_completed=false trains all."""
    from test_sweeps import TINY, gdn_exp, job_results

    sweep = ["-m", *TINY, "task.seq_len=8,3", "logger=none"]
    gdn_exp(tmp_path, *sweep, returncode=1)
    output = gdn_exp(tmp_path, *sweep, "trainer.log_interval=2", returncode=1)  # not a computation key
    assert "sweep: 1 reused, 1 failed" in output and "trainer.skip_completed=false" in output
    first, second = sorted(p for p in (tmp_path / "outputs/multiruns").iterdir() if not p.is_symlink())
    assert (tmp_path / "outputs/multiruns/latest").resolve() == second.resolve()
    trained, = [n for n, (r, _) in job_results(first).items() if r["status"] == "completed"]
    reused, = [(n, r) for n, (r, _) in job_results(second).items() if r["status"] == "completed"]
    assert reused[1]["reused_from"] == str((first / trained).resolve())
    job_dir = second / reused[0]
    assert (job_dir / "checkpoints/best.pt").is_file() and (job_dir / "metrics.jsonl").is_symlink()
    assert "reused: completed before in" in (job_dir / "cli.log").read_text()

    output = gdn_exp(tmp_path, *sweep, "trainer.max_steps=4", returncode=1)  # another computation: trained
    assert "sweep: 1 completed, 1 failed" in output
    output = gdn_exp(tmp_path, *sweep, "trainer.skip_completed=false", returncode=1)
    assert "sweep: 1 completed, 1 failed" in output


def test_help_lists_every_option_a_user_picks_and_no_internal_group(tmp_path):
    import subprocess
    import sys

    from gdn_exp.cli import CONF_DIR

    done = subprocess.run([sys.executable, "-m", "gdn_exp.cli", "--help"], capture_output=True, text=True, timeout=120)
    groups = done.stdout.split("== Groups (group=option) ==")[1].split("== Config ==")[0]
    for group in ("model", "task", "kernel", "ablation", "logger", "trainer", "experiment", "debug"):
        for option in sorted((CONF_DIR / group).glob("*.yaml")):
            assert f" {option.stem}" in groups, (group, option.stem)
    assert "schema" not in groups and "mqar_length " not in groups
    assert "outputs/runs/<date>_<time>-<µs>_<model>_<overrides>/" in done.stdout


def test_a_second_ctrl_c_stops_at_once(compose, tmp_path, monkeypatch, caplog):
    """The first SIGINT asks for a checkpoint after the step; a second one, while a long step still runs, stops
    now (KeyboardInterrupt, which `gdn-exp` turns into exit code 130 without a traceback)."""
    import os
    import signal

    import gdn_exp.train.step as step_module

    real_loss, calls = step_module.lm_loss, {"n": 0}

    def loss_then_two_sigints(logits, labels, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # two Ctrl-C during one step
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(logits, labels, **kwargs)

    monkeypatch.setattr(step_module, "lm_loss", loss_then_two_sigints)
    cfg = compose(*FAST, "trainer.max_steps=100", "trainer.eval_interval=100", "trainer.log_interval=100")
    with caplog.at_level(logging.WARNING, logger="gdn_exp"), pytest.raises(KeyboardInterrupt):
        run_job(cfg, tmp_path / "run")
    assert any("Ctrl-C again" in r.getMessage() for r in caplog.records)


def test_a_big_model_on_a_cpu_gets_a_warning(compose, tmp_path, monkeypatch, caplog):
    import gdn_exp.train.loop as loop

    monkeypatch.setattr(loop, "CPU_PARAMS_WARNING", 1000)
    with caplog.at_level(logging.WARNING, logger="gdn_exp"):
        assert run_job(compose(*FAST), tmp_path / "run")["status"] == "completed"
    assert any("it is meant for a GPU" in r.getMessage() for r in caplog.records)


def test_a_sweep_job_keeps_a_log_like_a_single_runs(compose, tmp_path):
    """Its cli.log holds the start-up line, a line per logged step (with the accuracy of the evaluation at that
    step, not the one before) and the outcome."""
    import json

    from omegaconf import OmegaConf

    from gdn_exp.sweep import Job, plan_workers, run_jobs

    cfg = compose(*FAST, "task.seq_len=8", "trainer.max_steps=4", f"task_cache_dir={tmp_path / 'cache'}")
    job = Job(0, OmegaConf.to_yaml(cfg), str(tmp_path / "job"), "job", "g")
    assert run_jobs([job], plan_workers(num_gpus=0, jobs_per_gpu=1, n_jobs=1))[0]["status"] == "completed"
    lines = (tmp_path / "job/cli.log").read_text().splitlines()
    rows = [json.loads(line) for line in (tmp_path / "job/metrics.jsonl").read_text().splitlines()]
    accuracy = {r["step"]: r["test/accuracy"] for r in rows if "test/accuracy" in r}
    assert any("parameters" in line for line in lines)
    for step in (1, 2, 3, 4):
        line, = [line for line in lines if f"step {step}/4 " in line]
        if step in accuracy:
            assert f"acc {accuracy[step]:.3f}" in line, (line, accuracy)
    assert "completed, test/accuracy" in lines[-1]


def test_config_yaml_records_what_each_auto_chose(compose, tmp_path):
    import yaml

    assert run_job(compose(*FAST), tmp_path / "run")["status"] == "completed"
    trainer = yaml.safe_load((tmp_path / "run/config.yaml").read_text())["trainer"]
    assert (trainer["device"], trainer["precision"], trainer["strategy"]) == ("cpu", "fp32", "none")
    assert trainer["num_threads"] == threads.auto_threads()


def test_the_notebook_writes_no_tracked_file():
    import json
    from pathlib import Path

    notebook = json.loads((Path(__file__).parents[1] / "examples/look_inside.ipynb").read_text())
    code = "".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    assert "docs/" not in code  # its figures go to outputs/look_inside/figures/


def test_a_config_mistake_leaves_no_run_directory(tmp_path):
    from test_cli import gdn_exp

    done = gdn_exp(tmp_path, "model=tiny", "model.num_heads=0")
    assert done.returncode == 1 and "model.num_heads=0" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "outputs").exists()


def test_the_start_up_line_names_a_hybrids_attention_layers():
    from gdn_exp.model import ModelConfig
    from gdn_exp.train.loop import describe_mixers

    assert describe_mixers(ModelConfig(n_layers=4)) == "gdn mixer"
    assert describe_mixers(ModelConfig(n_layers=2, mixer="attention")) == "attention mixer"
    assert describe_mixers(ModelConfig(n_layers=4, attention_every=2, attention_window=64)) == \
        "gdn mixer, attention in layers 2, 4 of 4, window 64"


def test_checkpoints_and_exports_get_the_umasks_mode_and_a_cpu_note(compose, tmp_path, capsys):
    import os

    pytest.importorskip("safetensors")
    from gdn_exp.export import main as export

    previous = os.umask(0o022)
    try:
        assert run_job(compose(*FAST), tmp_path / "run")["status"] == "completed"
        export([str(tmp_path / "run"), str(tmp_path / "hf")])
    finally:
        os.umask(previous)
    for path in [*(tmp_path / "run/checkpoints").glob("*.pt"), tmp_path / "hf/model.safetensors"]:
        assert oct(path.stat().st_mode & 0o777) == "0o644", path
    import torch

    assert ("import_fla" in capsys.readouterr().out) == (not torch.cuda.is_available())  # the note: on a CPU only


def test_curves_wrap_into_a_grid_with_plain_log_ticks(tmp_path, monkeypatch):
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gdn_exp import report

    runs = []
    for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
        run_dir = tmp_path / f"lr={lr}"
        run_dir.mkdir()
        rows = [{"step": s, "train/loss": 5.0 - s / 100, "test/accuracy": s / 200} for s in (10, 100, 200)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(report.Run(run_dir, {"trainer.lr": lr}, {}, {}, {"test/accuracy": 1.0}))
    monkeypatch.setattr(plt, "close", lambda fig: None)  # keep the figure to read its tick labels
    report.plot_curves(runs, ["trainer.lr"], "test/accuracy", tmp_path / "curves.png")
    height, width, _ = plt.imread(tmp_path / "curves.png").shape
    assert width < 1500 and height > width / 2, (width, height)  # 3 columns and 2 rows of panel pairs, not 5 wide
    loss_axes = [ax for ax in plt.gcf().axes if ax.get_visible() and ax.get_yscale() == "log"]
    assert len(loss_axes) == 5
    labels = [t.get_text() for t in loss_axes[0].get_yticklabels(minor=True) if t.get_text()]
    assert labels and all("10" not in text and "times" not in text for text in labels), labels  # 3, 4, not 4x10^0
    plt.close("all")


def test_a_dry_run_lists_what_a_sweep_would_train_skip_and_reuse(tmp_path):
    from test_sweeps import TINY, gdn_exp

    gdn_exp(tmp_path, "-m", *TINY, "task.seq_len=8,16", "logger=none")
    (first,) = [p for p in (tmp_path / "outputs/multiruns").iterdir() if not p.is_symlink()]
    grown = ["-m", *TINY, "task.seq_len=8,16,32", "logger=none", "hydra.launcher.dry_run=true"]
    pinned = gdn_exp(tmp_path, *grown, f"hydra.sweep.dir={first}")
    assert "dry run, nothing trained: 3 jobs, 1 to train, 2 to skip, 0 to reuse" in pinned
    assert pinned.count("  skip ") == 2 and pinned.count("  train ") == 1
    fresh = gdn_exp(tmp_path, *grown)
    assert "3 jobs, 1 to train, 0 to skip, 2 to reuse" in fresh and f"<- {first.resolve()}/" in fresh
    assert sorted((tmp_path / "outputs/multiruns").iterdir()) == [first, first.parent / "latest"]  # nothing made
    assert (first.parent / "latest").resolve() == first.resolve()  # a dry run moves no pointer
    assert not list(first.glob("*seq_len=32*"))
    assert (first / "multirun.yaml").read_text().count("task.seq_len=8,16,32") == 0  # the sweep's own, kept


def test_debug_fdr_runs_a_few_steps_of_everything(compose, tmp_path):
    import json

    cfg = compose("debug=fdr", "model=tiny", "task=copy", "logger=none")
    assert run_job(cfg, tmp_path / "run")["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "test/accuracy" in r] == [2, 4]
    assert {p.name for p in (tmp_path / "run/checkpoints").iterdir()} >= {"latest.pt", "previous.pt", "best.pt"}


def test_runs_have_readable_names_and_a_latest_pointer(tmp_path):
    from test_cli import gdn_exp

    overrides = ["model=tiny", "task=copy", "task.num_train=64", "task.num_test=16", "task.copy_len=2",
                 "task.seq_len=8", "trainer.max_steps=2", "trainer.eval_interval=2", "trainer.batch_size=4"]
    for seed in (0, 1):
        assert gdn_exp(tmp_path, *overrides, f"seed={seed}").returncode == 0
    runs = tmp_path / "outputs/runs"
    names = sorted(p.name for p in runs.iterdir() if not p.is_symlink())
    assert len(names) == 2 and all(len(name) <= 60 for name in names), names
    assert names[0][-8:] != names[1][-8:]  # cut to length, told apart by the hash of the whole
    assert (runs / "latest").resolve() == (runs / names[1]).resolve()
    assert (runs / "latest/results.json").is_file()
    from gdn_exp import report

    assert len(report.find_run_dirs([str(runs / "*")])) == 2  # latest is not a third run
    assert report.find_run_dirs([str(runs / "latest")]) == [runs / "latest"]
