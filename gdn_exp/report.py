"""`gdn-exp-report`: one table and a few plots from the run directories of one or more sweeps.

    gdn-exp-report outputs/multiruns/2025-06-01_12-00-00-000000 --best-over trainer.lr --out report/

Every directory under a PATH that holds a results.json is a run. Its .hydra/overrides.yaml gives the parameters
that were set on the command line or by the sweeper (less those kept out of job dir names, such as logger and
task_cache_dir), .hydra/config.yaml the full config and metrics.jsonl the training curves. The parameters whose
values differ between the runs are the table's columns (the others are listed once above it). With --best-over
KEY (e.g. trainer.lr) the table keeps, for each setting of the other parameters, the run with the best metric,
as Zoology's figures take the best learning rate per point.

When the runs differ in `seed`, a row is a setting of the other parameters over its seeds (--per-seed: a row per
run): the number of seeds, the metric's mean and min-max, how many seeds reached trainer.target_accuracy and their
median steps to it; --best-over picks by the seed mean, and the plots draw each seed's point beside the mean.

Outputs: a markdown table on stdout (--csv: CSV); with --out DIR also runs.csv (every run), best.csv (with
--best-over), report.md (table, failures, plots) and the plots: <metric> against each of d_model, seq_len,
copy_len and num_kv_pairs that varies (one line per setting of the other parameters, one panel per task and
value of the other plotted sizes) and training curves from metrics.jsonl (one panel per line setting).
"""
import argparse
import csv
import glob
import io
import json
import math
import statistics
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gdn_exp import tables
from gdn_exp.config import flatten_config
from gdn_exp.extras import have, missing

# Config keys that get a "<metric> vs <key>" plot when they take several values.
PLOT_AXES = ("model.d_model", "task.seq_len", "task.copy_len", "task.num_kv_pairs")
CURVE_COLUMNS = 3  # curves.png: panels a row, so that many settings wrap into a grid rather than one wide row
RESULT_COLUMNS = ("status", "test/accuracy", "best/accuracy", "steps_to_target", "steps", "num_params", "wall_time_s")


@dataclass
class Run:
    """One run directory: its parameters (override key -> value), flattened config and results.json."""

    path: Path
    params: dict   # e.g. {"ablation": "none", "model.d_model": 64, "trainer.lr": 0.001}
    config: dict   # resolved config with dotted keys, e.g. {"model.d_model": 64, "task.name": "mqar", ...}
    choices: dict  # config group -> chosen option, e.g. {"ablation": "none", "model": "small"}
    results: dict  # results.json

    def value(self, key: str):
        """A parameter, a config value, a group choice or a result, in that order of lookup (None: absent)."""
        for source in (self.params, self.config, self.choices, self.results):
            if key in source:
                return source[key]
        return None

    def metric(self, name: str) -> float:
        """results[name] as a float; NaN when the run has none (failed) or it is not a number."""
        value = self.results.get(name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

    def samples(self, name: str) -> list[float]:
        """The values of `name` behind this row's: one run's."""
        return [self.metric(name)]


@dataclass
class Seeds:
    """The runs of one setting that differ only in `seed`, as one row of the table (same interface as Run).

    value(key): a parameter; "seeds" (how many runs); a result's mean over the seeds that have it ("<name> min",
    "<name> max": its range); "status" ("2 completed, 1 failed"); "reached target" ("2/3": seeds whose
    steps_to_target is set) and "median steps_to_target" (over those); else the runs' common value (None if
    they differ).
    """

    params: dict   # the runs' parameters, less seed
    runs: list     # [Run], one per seed

    @property
    def path(self) -> str:
        return ";".join(str(run.path) for run in self.runs)

    def samples(self, name: str) -> list[float]:
        return [run.metric(name) for run in self.runs]

    def metric(self, name: str) -> float:
        values = [v for v in self.samples(name) if not math.isnan(v)]
        return statistics.fmean(values) if values else math.nan

    def steps_to_target(self) -> list:
        """The steps_to_target of the seeds that reached the target; None when no run records it (older runs)."""
        if not any("steps_to_target" in run.results for run in self.runs):
            return None
        return [run.results["steps_to_target"] for run in self.runs if run.results.get("steps_to_target") is not None]

    def value(self, key: str):
        if key in self.params:
            return self.params[key]
        name, _, bound = key.rpartition(" ")
        if key == "seeds":
            return len(self.runs)
        if key == "status":
            counts = defaultdict(int)
            for run in self.runs:
                counts[run.results.get("status", "?")] += 1
            return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        if key == "reached target":
            reached = self.steps_to_target()
            return None if reached is None else f"{len(reached)}/{len(self.runs)}"
        if key == "median steps_to_target":
            reached = self.steps_to_target()
            return statistics.median(reached) if reached else None
        if bound in ("min", "max"):
            values = [v for v in self.samples(name) if not math.isnan(v)]
            return (min if bound == "min" else max)(values) if values else None
        values = {repr(run.value(key)): run.value(key) for run in self.runs}
        if len(values) == 1:
            return next(iter(values.values()))
        return None if math.isnan(self.metric(key)) else self.metric(key)


def over_seeds(runs: list[Run], params: list[str]) -> list[Seeds]:
    """One Seeds row per setting of the swept `params` other than seed."""
    keys = [key for key in params if key != "seed"]
    groups = defaultdict(list)
    for run in runs:
        groups[tuple(repr(run.value(k)) for k in keys)].append(run)
    return [Seeds({k: v for k, v in group[0].params.items() if k != "seed"}, group) for group in groups.values()]


def find_run_dirs(patterns: list[str]) -> list[Path]:
    """Run directories (holding results.json) at or below each path; a path may be a glob pattern."""
    run_dirs = set()
    for pattern in patterns:
        # a pattern's symlinks (outputs/runs/latest) are the runs it also matches by name; named alone, one counts
        paths = [Path(p) for p in sorted(glob.glob(pattern)) if not Path(p).is_symlink()] or [Path(pattern)]
        for path in paths:
            if not path.exists():
                raise ValueError(f"{pattern}: no such file or directory")
            results = [path] if path.name == "results.json" else path.rglob("results.json")
            run_dirs.update(p.parent for p in results)
    return sorted(run_dirs)


def parse_overrides(lines: list[str]) -> dict:
    """{key: value} of Hydra override strings, values typed as Hydra reads them ("trainer.lr=1e-3" -> 0.001);
    a list or dict value keeps its text ("ablation=[no_conv,no_gate]" -> "[no_conv,no_gate]")."""
    params = {}
    for override in OverridesParser.create().parse_overrides(lines):
        value = override.value()
        if isinstance(value, (list, dict)):
            value = override.input_line.split("=", 1)[1]
        params[override.key_or_group] = value
    return params


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """load_run of each run dir; one whose records do not read (a torn results.json) is named in one line on
    stderr and left out."""
    runs = []
    for run_dir in run_dirs:
        try:
            runs.append(load_run(run_dir))
        except Exception as e:  # JSON, YAML or override syntax: whichever record is damaged
            print(f"warning: leaving out {run_dir}: its records do not read ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:120] if str(e) else ''})", file=sys.stderr)
    return runs


def load_run(run_dir: Path) -> Run:
    results = json.loads((run_dir / "results.json").read_text())
    if not isinstance(results, dict):
        raise ValueError(f"results.json holds {json.dumps(results)[:40]}, not a run's results")
    hydra_dir = run_dir / ".hydra"
    config, params, choices, bookkeeping = {}, {}, {}, []
    if (hydra_dir / "config.yaml").is_file():
        config = flatten_config(OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=True))
    if (hydra_dir / "hydra.yaml").is_file():
        hydra_cfg = OmegaConf.load(hydra_dir / "hydra.yaml").hydra
        choices = OmegaConf.to_container(hydra_cfg.runtime.choices)  # a group left at its default is only here
        bookkeeping = hydra_cfg.job.config.override_dirname.exclude_keys  # e.g. logger, trainer.progress
    if (hydra_dir / "overrides.yaml").is_file():
        lines = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml"))
        params = {k: v for k, v in parse_overrides(lines).items() if k not in bookkeeping}
    return Run(run_dir, params, config, choices, results)


def sort_key(value):
    """Orders numbers numerically and before text, so mixed columns still sort."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def varying(runs: list[Run], keys) -> list[str]:
    """The keys whose value (`Run.value`) differs between the runs."""
    return [key for key in keys if len({repr(run.value(key)) for run in runs}) > 1]


def swept_keys(runs: list[Run]) -> list[str]:
    """Parameters whose value differs between the runs, in first-seen order. A run that does not set one
    has its config's value, so two sweeps that differ only in what they spelled out agree."""
    return varying(runs, dict.fromkeys(key for run in runs for key in run.params))


def fixed_params(runs: list[Run]) -> dict:
    """Parameters every run sets to the same value."""
    swept = swept_keys(runs)
    return {key: value for key, value in runs[0].params.items() if key not in swept} if runs else {}


def determined_by(runs: list[Run], key: str, keys: list[str]) -> bool:
    """True when the runs' values of `keys` fix their value of `key`."""
    seen = {}
    for run in runs:
        if seen.setdefault(tuple(repr(run.value(k)) for k in keys), repr(run.value(key))) != repr(run.value(key)):
            return False
    return True


def best_over(runs: list[Run], key: str, metric: str) -> list[Run]:
    """One run per setting of the swept parameters other than `key`: the one with the highest `metric`
    (a setting whose runs all lack the metric keeps its first run, e.g. a failed one)."""
    group_keys = [k for k in swept_keys(runs) if k != key]
    groups = defaultdict(list)
    for run in runs:
        groups[tuple(repr(run.value(k)) for k in group_keys)].append(run)
    best = []
    for group in groups.values():
        scored = [run for run in group if not math.isnan(run.metric(metric))]
        best.append(max(scored, key=lambda run: run.metric(metric)) if scored else group[0])
    return best


def sort_runs(runs: list[Run], keys: list[str]) -> list[Run]:
    return sorted(runs, key=lambda run: [sort_key(run.value(k)) for k in keys] + [str(run.path)])


def columns_for(metric: str, seeds: bool = False) -> list[str]:
    """The result columns of the table: a run's, or with seeds those of a Seeds row."""
    if seeds:
        return ["seeds", "status", metric, f"{metric} min", f"{metric} max", "reached target",
                "median steps_to_target", "num_params"]
    return list(dict.fromkeys(["status", metric, *RESULT_COLUMNS]))


def format_cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def runs_table(runs: list[Run], params: list[str], metric: str, seeds: bool = False) -> str:
    columns = params + columns_for(metric, seeds)
    return tables.markdown_table(columns, [[format_cell(run.value(c)) for c in columns] for run in runs]) + "\n"


def csv_table(runs: list[Run], params: list[str], metric: str, seeds: bool = False) -> str:
    """Every row a run (or Seeds: run_dir lists theirs, separated by ;): its parameters, results, error (failed
    runs) and directory."""
    columns = params + columns_for(metric, seeds) + ["error", "run_dir"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for run in runs:
        row = [run.value(c) for c in columns[:-1]] + [str(run.path)]
        writer.writerow(["" if v is None else v for v in row])
    return out.getvalue()


def failure_summary(runs: list[Run]) -> str:
    """One markdown line per distinct error: how many runs failed with it."""
    errors = defaultdict(int)
    for run in runs:
        if run.results.get("status") == "failed":
            errors[run.results.get("error", "?")] += 1
    return "".join(f"- {count} failed: {error}\n" for error, count in errors.items())


def summary_line(runs: list[Run]) -> str:
    statuses = defaultdict(int)
    for run in runs:
        statuses[run.results.get("status", "?")] += 1
    fixed = " ".join(f"{k}={format_cell(v)}" for k, v in fixed_params(runs).items())
    return (f"{len(runs)} runs ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))})"
            + (f"; fixed: `{fixed}`" if fixed else "") + "\n")


def label(run: Run, keys: list[str]) -> str:
    return ", ".join(f"{key.split('.')[-1]}={format_cell(run.value(key))}" for key in keys) or "all runs"


def plot_metric_vs(runs: list[Run], axis: str, params: list[str], metric: str, path: Path) -> None:
    """<metric> against config key `axis` (log2 x): one panel per setting of the task and the other PLOT_AXES
    that vary, one line per setting of the remaining swept parameters; several runs at one point show the best.
    A Seeds row's point is its mean, drawn with each seed's value beside it."""
    import matplotlib.pyplot as plt

    panel_keys = [key for key in varying(runs, ("task", *PLOT_AXES)) if key != axis]
    # a parameter that the panel already fixes (a preset's mqar_length sets seq_len and num_kv_pairs) draws no lines
    line_keys = [key for key in params if key != axis and key not in panel_keys
                 and not determined_by(runs, key, panel_keys + [axis])]
    panels = defaultdict(lambda: defaultdict(dict))  # panel -> line -> x -> best y
    samples = defaultdict(dict)  # (panel, line) -> x -> the values behind the best y (the seeds')
    order = {}  # panel label -> its values, to order the panels by value rather than by text
    for run in runs:
        x, y = run.value(axis), run.metric(metric)
        if x is None or math.isnan(y):
            continue
        panel = label(run, panel_keys)
        order[panel] = [sort_key(run.value(key)) for key in panel_keys]
        line = label(run, line_keys)
        points = panels[panel][line]
        if y > points.get(x, -math.inf):
            points[x], samples[panel, line][x] = y, run.samples(metric)
    all_lines = sorted({line for lines in panels.values() for line in lines})
    colors = {line: f"C{i % 10}" for i, line in enumerate(all_lines)}  # a line has one color in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (panel, lines) in zip(axes[0], sorted(panels.items(), key=lambda item: order[item[0]])):
        xs_all = set()
        for line, points in sorted(lines.items()):
            xs = sorted(points)
            xs_all.update(xs)
            ax.plot(xs, [points[x] for x in xs], marker="o", color=colors[line], label=line)
            seeds = [(x, v) for x in xs for v in samples[panel, line][x] if len(samples[panel, line][x]) > 1]
            if seeds:
                ax.scatter(*zip(*seeds), color=colors[line], s=12, alpha=0.45, linewidths=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs_all), [format_cell(x) for x in sorted(xs_all)])
        ax.minorticks_off()
        ax.set_title(textwrap.fill(panel, 50), fontsize=9)  # long settings wrap, not run into the next panel
        ax.set_xlabel(axis)
        ax.grid(alpha=0.3)
        if "accuracy" in metric:
            ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def plot_curves(runs: list[Run], params: list[str], metric: str, path: Path) -> None:
    """Training curves from metrics.jsonl: `metric` (upper) and train/loss (lower) against the step, one such pair
    of panels per setting of the swept parameters that are not PLOT_AXES (at most CURVE_COLUMNS pairs a row), one
    line per run."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    panel_keys = [key for key in params if key not in PLOT_AXES]
    line_keys = [key for key in params if key in PLOT_AXES]
    panels = defaultdict(list)
    for run in runs:
        panels[label(run, panel_keys)].append(run)
    colors = {line: f"C{i % 10}" for i, line in enumerate(sorted({label(run, line_keys) for run in runs}))}
    columns = min(CURVE_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(2 * rows, columns, figsize=(4.2 * columns, 6 * rows), squeeze=False)
    pairs = [(axes[2 * (i // columns)][i % columns], axes[2 * (i // columns) + 1][i % columns])
             for i in range(rows * columns)]
    labelled = set()  # the seeds of a setting share their line's color and legend entry
    for ax in (ax for pair in pairs[len(panels):] for ax in pair):  # the last row's empty places
        ax.set_visible(False)
    for (top, bottom), (panel, panel_runs) in zip(pairs, sorted(panels.items())):
        for run in sort_runs(panel_runs, line_keys):
            rows_of_run = read_metrics(run.path)
            for ax, name in ((top, metric), (bottom, "train/loss")):
                points = [(r["step"], float(r[name])) for r in rows_of_run if name in r]
                if points:
                    line = label(run, line_keys)
                    ax.plot(*zip(*points), color=colors[line], linewidth=1.2,
                            label=None if (line, name) in labelled else line)
                    labelled.add((line, name))
        top.set_title(textwrap.fill(panel, 50), fontsize=9)
        if "accuracy" in metric:
            top.set_ylim(0, 1.02)
        bottom.set_yscale("log")
        bottom.yaxis.set_major_formatter(LogFormatter())  # plain numbers (4, 0.5), not 4x10^0
        bottom.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        bottom.set_xlabel("step")
        top.set_ylabel(metric)
        bottom.set_ylabel("train/loss")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, loc="best")  # a line has one color in every panel
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(runs: list[Run], params: list[str], metric: str, out_dir: Path) -> list[Path]:
    """The PNGs for the table's runs that have the metric; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    plotted = [run for run in runs if not math.isnan(run.metric(metric))]
    name = metric.split("/")[-1]
    paths = []
    for axis in varying(plotted, PLOT_AXES):
        paths.append(out_dir / f"{name}_vs_{axis.split('.')[-1]}.png")
        plot_metric_vs(plotted, axis, params, metric, paths[-1])
    if plotted:
        paths.append(out_dir / "curves.png")
        plot_curves([run for row in plotted for run in getattr(row, "runs", [row])], params, metric, paths[-1])
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="gdn-exp-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="sweep dirs, run dirs or glob patterns")
    parser.add_argument("--best-over", metavar="KEY", help="keep the best run over this parameter, e.g. trainer.lr")
    parser.add_argument("--metric", default="test/accuracy", help="results.json key to rank and plot "
                        "(default: test/accuracy)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="write runs.csv, best.csv, report.md and the PNGs here")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    parser.add_argument("--per-seed", action="store_true", help="a row per run, where runs that differ only in "
                        "seed are otherwise one row (their mean, range and how many reached the target)")
    args = parser.parse_args(argv)

    try:
        runs = load_runs(find_run_dirs(args.paths))
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not runs:
        sys.exit(f"error: no results.json under {' '.join(args.paths)}")
    params = swept_keys(runs)
    if args.best_over and args.best_over not in params:
        sys.exit(f"error: --best-over {args.best_over} is not a swept parameter; swept: {', '.join(params) or 'none'}")
    seeds = "seed" in params and not args.per_seed and args.best_over != "seed"
    rows = over_seeds(runs, params) if seeds else runs
    row_params = [key for key in params if key != "seed"] if seeds else params
    table = sort_runs(best_over(rows, args.best_over, args.metric) if args.best_over else rows, row_params)
    table_params = [key for key in row_params if key != args.best_over] + ([args.best_over] if args.best_over else [])

    markdown = summary_line(runs)
    if seeds:
        best = f"; of the settings that differ in {args.best_over}, the best mean" if args.best_over else ""
        markdown += f"\nEach row: one setting over its seeds ({args.metric}: mean, min, max{best}).\n"
    elif args.best_over:
        markdown += f"\nEach row: the run with the best {args.metric} over {args.best_over} (see its column).\n"
    markdown += "\n" + runs_table(table, table_params, args.metric, seeds)
    failures = failure_summary(runs)
    if failures:
        markdown += "\n" + failures
    print(csv_table(table, table_params, args.metric, seeds) if args.csv else markdown, end="")

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runs.csv").write_text(csv_table(sort_runs(runs, params), params, args.metric))
        if args.best_over:
            (args.out / "best.csv").write_text(csv_table(table, table_params, args.metric, seeds))
        plots = []
        if have("matplotlib"):
            plots = write_plots(table, [key for key in row_params if key != args.best_over], args.metric, args.out)
        else:
            print(missing("matplotlib", "plots"), file=sys.stderr)
        images = "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
        (args.out / "report.md").write_text(markdown + images)
        written = ["runs.csv"] + (["best.csv"] if args.best_over else []) + ["report.md"] + [p.name for p in plots]
        print(f"wrote {', '.join(written)} to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
