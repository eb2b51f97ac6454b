"""`gdn-exp-report` on a hand-made sweep: the swept parameters become columns, --best-over keeps the best
learning rate per point, failures are counted, and --out writes the CSVs, report.md and the PNGs; on a real
two-seed sweep, one row per setting over its seeds."""
import csv
import io
import json
import statistics
import subprocess
import sys

import pytest
import yaml

from gdn_exp import report

LRS = (1e-3, 1e-2)


def accuracy(ablation: str, d_model: int, seq_len: int, lr: float) -> float:
    """A made-up result: better with width, worse with length, lr 1e-2 best except for attention."""
    best_lr = 1e-3 if ablation == "attention" else 1e-2
    return round(0.3 + d_model / 200 - seq_len / 1000 + (0.1 if lr == best_lr else 0.0), 4)


def write_run(run_dir, overrides: list, config: dict, results: dict, metrics: list) -> None:
    """A run dir as `gdn-exp -m` writes it (its hydra.yaml cut to what the report reads)."""
    exclude_keys = ["trainer.progress", "task_cache_dir"]
    hydra = {"hydra": {"runtime": {"choices": {"model": "small", "task": "mqar"}},
                       "job": {"config": {"override_dirname": {"exclude_keys": exclude_keys}}}}}
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra/overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / ".hydra/config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra/hydra.yaml").write_text(yaml.safe_dump(hydra))
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))


@pytest.fixture
def sweep(tmp_path):
    """A 2 x 2 x 2 x 2 sweep (ablation, d_model, seq_len, lr) in the layout `gdn-exp -m` writes, with one job
    failed (none, 64, 64, lr 1e-2) and overrides kept out of dir names, which must not become columns."""
    sweep_dir = tmp_path / "2025-01-01_00-00-00-000000"
    job = 0
    for ablation in ("none", "attention"):
        for d_model in (32, 64):
            for seq_len in (32, 64):
                for lr in LRS:
                    overrides = ["+experiment=mqar_smoke", f"ablation={ablation}", f"model.d_model={d_model}",
                                 f"task.seq_len={seq_len}", f"trainer.lr={lr}", "trainer.progress=false",
                                 f"task_cache_dir=/tmp/cache{job}"]
                    config = {"model": {"d_model": d_model, "head_dim": "${model.d_model}"},
                              "task": {"name": "mqar", "seq_len": seq_len}, "trainer": {"lr": lr}}
                    acc = accuracy(ablation, d_model, seq_len, lr)
                    if (ablation, d_model, seq_len, lr) == ("none", 64, 64, 1e-2):
                        results = {"status": "failed", "error": "out of memory", "user_error": False}
                    else:
                        results = {"status": "completed", "test/accuracy": acc, "best/accuracy": acc,
                                   "steps": 100, "num_params": 1000 * d_model, "wall_time_s": 2.5}
                    metrics = [{"step": 10, "train/loss": 3.0, "train/lr": lr},
                               {"step": 50, "train/loss": 1.0, "test/accuracy": acc / 2},
                               {"step": 100, "train/loss": 0.5, "test/accuracy": acc}]
                    write_run(sweep_dir / f"{job}_job", overrides, config, results, metrics)
                    job += 1
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    return sweep_dir


def parse_markdown(text: str) -> tuple[list, list]:
    """(header, rows) of the one markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def test_table_has_the_swept_parameters_as_columns(sweep, capsys):
    report.main([str(sweep)])
    out = capsys.readouterr().out
    header, rows = parse_markdown(out)
    assert header == ["ablation", "model.d_model", "task.seq_len", "trainer.lr", "status", "test/accuracy",
                      "best/accuracy", "steps_to_target", "steps", "num_params", "wall_time_s"]
    assert len(rows) == 16
    assert out.startswith("16 runs (15 completed, 1 failed); fixed: `experiment=mqar_smoke`")
    assert "- 1 failed: out of memory" in out
    by_point = {tuple(row[:4]): row for row in rows}
    assert by_point["none", "64", "64", "0.01"][4:6] == ["failed", ""]
    assert by_point["attention", "32", "64", "0.001"][4:6] == ["completed", str(accuracy("attention", 32, 64, 1e-3))]
    assert [row[0] for row in rows] == ["attention"] * 8 + ["none"] * 8  # sorted by the parameter columns


def test_best_over_lr_keeps_the_best_run_of_each_point(sweep, capsys):
    report.main([str(sweep), "--best-over", "trainer.lr", "--csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 8
    for row in rows:
        point = (row["ablation"], int(row["model.d_model"]), int(row["task.seq_len"]))
        if point == ("none", 64, 64):  # lr 1e-2 failed: 1e-3 is the best that ran
            best_lr = 1e-3
        else:
            best_lr = max(LRS, key=lambda lr: accuracy(*point, lr))
        assert float(row["trainer.lr"]) == best_lr, row
        assert float(row["test/accuracy"]) == accuracy(*point, best_lr)
        assert row["run_dir"].startswith(str(sweep))


def test_out_writes_tables_report_and_plots(sweep, tmp_path, capsys):
    out_dir = tmp_path / "report"
    report.main([str(sweep), "--best-over", "trainer.lr", "--out", str(out_dir)])
    markdown = capsys.readouterr().out
    with open(out_dir / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 16
    with open(out_dir / "best.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    plots = ["accuracy_vs_d_model.png", "accuracy_vs_seq_len.png", "curves.png"]
    text = (out_dir / "report.md").read_text()
    assert text.startswith(markdown) and all(f"]({name})" in text for name in plots)
    for name in plots:
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_paths_may_be_globs_and_single_run_dirs(sweep, capsys):
    report.main([str(sweep.parent / "2025-*"), str(sweep / "0_job")])  # the glob already holds 0_job
    assert len(parse_markdown(capsys.readouterr().out)[1]) == 16
    report.main([str(sweep / "3_job")])  # one run: nothing is swept
    header, rows = parse_markdown(capsys.readouterr().out)
    assert header[0] == "status" and len(rows) == 1


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such file or directory"),
    (["{empty}"], "no results.json"),
    (["{sweep}", "--best-over", "trainer.batch_size"], "--best-over trainer.batch_size is not a swept parameter"),
])
def test_bad_arguments_end_in_one_line(sweep, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "sweep": sweep}
    with pytest.raises(SystemExit, match=message):
        report.main([arg.format(**paths) for arg in args])


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory):
    """A real sweep through `gdn-exp -m`: 2 seeds x 2 learning rates of a tiny copy task, 4 steps each, every run
    at the (zero) target from its first evaluation on."""
    tmp_path = tmp_path_factory.mktemp("seeds")
    command = [sys.executable, "-m", "gdn_exp.cli", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
               "hydra.launcher.n_jobs=2", "model=tiny", "task=copy", "task.num_train=64", "task.num_test=16",
               "task.copy_len=2", "task.seq_len=8", "trainer.max_steps=4", "trainer.eval_interval=2",
               "trainer.log_interval=1", "trainer.batch_size=4", "trainer.num_threads=1", "trainer.progress=false",
               "trainer.target_accuracy=0.0", "logger=none", f"task_cache_dir={tmp_path / 'cache'}",
               "seed=0,1", "trainer.lr=1e-3,3e-3"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path / "sweep"


def test_a_two_seed_sweep_is_one_row_per_learning_rate(seed_sweep, tmp_path, capsys):
    runs = [report.load_run(path) for path in report.find_run_dirs([str(seed_sweep)])]
    by_lr = {lr: [run for run in runs if run.value("trainer.lr") == lr] for lr in (1e-3, 3e-3)}
    losses = {lr: [run.metric("test/loss") for run in group] for lr, group in by_lr.items()}
    assert all(len(set(values)) == 2 for values in losses.values())  # the seeds trained different models

    report.main([str(seed_sweep), "--metric", "test/loss", "--out", str(tmp_path / "out")])
    header, rows = parse_markdown(capsys.readouterr().out)
    assert header == ["trainer.lr", "seeds", "status", "test/loss", "test/loss min", "test/loss max",
                      "reached target", "median steps_to_target", "num_params"]
    assert [row[0] for row in rows] == ["0.001", "0.003"]
    for row, (lr, values) in zip(rows, losses.items()):
        expected = [2, "2 completed", statistics.fmean(values), min(values), max(values), "2/2", 2,
                    by_lr[lr][0].results["num_params"]]
        assert row[1:] == [report.format_cell(value) for value in expected], row
    assert (tmp_path / "out/curves.png").read_bytes()[:4] == b"\x89PNG"

    report.main([str(seed_sweep), "--metric", "test/loss", "--best-over", "trainer.lr", "--csv"])
    (best,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    best_lr = max(losses, key=lambda lr: statistics.fmean(losses[lr]))  # by the mean, not the best seed
    assert float(best["trainer.lr"]) == best_lr and len(best["run_dir"].split(";")) == 2

    report.main([str(seed_sweep), "--per-seed"])
    header, rows = parse_markdown(capsys.readouterr().out)
    assert header[:2] == ["seed", "trainer.lr"] and len(rows) == 4


@pytest.mark.parametrize("damage", ['{"status": "comp', "", "null"])
def test_a_run_whose_records_do_not_read_is_named_and_left_out(sweep, capsys, damage):
    (sweep / "0_job/results.json").write_text(damage)
    report.main([str(sweep)])
    captured = capsys.readouterr()
    assert len(parse_markdown(captured.out)[1]) == 15
    assert [line for line in captured.err.splitlines() if "0_job" in line] == [
        next(line for line in captured.err.splitlines() if line.startswith(f"warning: leaving out {sweep / '0_job'}"))]
