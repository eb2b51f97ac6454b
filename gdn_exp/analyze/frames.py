"""Run metrics as pandas DataFrames (pandas is imported when called: `pip install -e ".[analyze]"`).

    metrics("outputs/runs/<run dir>")        one row per logged step (metrics.jsonl)
    results("outputs/multiruns/<sweep>")     one row per run: its swept parameters and results.json
"""
from pathlib import Path

from gdn_exp import report


def run_name(run_dir: Path, root: Path) -> str:
    """The run's directory relative to `root` (a sweep's job dir name), or its own name when it is `root`."""
    return run_dir.name if run_dir == root else str(run_dir.relative_to(root))


def metrics(path):
    """Every logged step of the runs at or under `path` (a run or sweep directory): a DataFrame with columns run
    (`run_name`), step and one per metric (train/loss, test/accuracy, ...; NaN on rows that do not log it)."""
    import pandas as pd

    root = Path(path)
    rows = [{"run": run_name(run_dir, root), **row}
            for run_dir in report.find_run_dirs([str(root)]) for row in report.read_metrics(run_dir)]
    return pd.DataFrame(rows)


def results(path):
    """One row per run at or under `path`: run (`run_name`), the parameters that differ between the runs (as in
    `gdn-exp-report`) and every value of its results.json."""
    import pandas as pd

    root = Path(path)
    runs = [report.load_run(run_dir) for run_dir in report.find_run_dirs([str(root)])]
    swept = report.swept_keys(runs)
    return pd.DataFrame([{"run": run_name(run.path, root), **{key: run.value(key) for key in swept}, **run.results}
                         for run in runs])
