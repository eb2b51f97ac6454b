"""Where metrics go: always <run dir>/metrics.jsonl, and a wandb run unless logger=none.

Metric names are namespaced: train/loss, train/lr, test/accuracy, test/accuracy/num_kv_pairs=8,
perf/tokens_per_s, mem/peak_gib.
"""
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)
_OPEN = {"run": None}  # the wandb run of the job in progress, which a crash would leave open


class RunLogger:
    """Appends one JSON object per call to metrics.jsonl and mirrors it to wandb.

    Args:
        run_dir: the job's output directory.
        logger_cfg: the `logger` config node (name, project, mode, entity, group, tags).
        config: the resolved run config (a plain dict), recorded by wandb.
        history: an earlier run's metrics.jsonl to continue (resume): of its first `history_rows` rows (those
            written before the checkpoint; None: all), those up to `resume_step` that read as JSON are kept.
        resume_step: the step of the checkpoint being resumed.
        history_rows: the checkpoint's `rows`.
        wandb_id: the id of the wandb run to continue, if any.
    """

    def __init__(self, run_dir: Path, logger_cfg, config: dict, *, history: Optional[Path] = None,
                 resume_step: Optional[int] = None, history_rows: Optional[int] = None,
                 wandb_id: Optional[str] = None):
        self.path = run_dir / "metrics.jsonl"
        rows = []
        if history is not None and history.is_file():
            rows = [line for line in history.read_text().splitlines()[:history_rows]
                    if line and _step(line, history) <= resume_step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")  # replaced whole: a kill keeps the history
        tmp.write_text("".join(row + "\n" for row in rows))
        os.replace(tmp, self.path)
        self.rows = len(rows)  # rows in metrics.jsonl, which a checkpoint records
        self.wandb_run = None
        if logger_cfg.name == "wandb" and logger_cfg.mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=logger_cfg.project, entity=logger_cfg.entity, group=logger_cfg.group,
                tags=list(logger_cfg.tags), mode=str(logger_cfg.mode), dir=str(run_dir), config=config,
                name=run_dir.name, id=wandb_id, resume="allow" if wandb_id else None, reinit="create_new",
                settings=wandb.Settings(console="off", silent=True))
            _OPEN["run"] = self.wandb_run

    @property
    def wandb_id(self) -> Optional[str]:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def finish(self, summary: dict) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
            self.wandb_run.finish()
            self.wandb_run = _OPEN["run"] = None


class SilentLogger:
    """Stands in for RunLogger on ranks other than 0: they log nothing."""

    wandb_id = None
    rows = 0

    def log(self, step: int, metrics: dict) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


def _step(line: str, path: Path) -> float:
    """A metrics.jsonl row's step; infinity (dropped) for a line that does not read (torn by a kill mid-write),
    with one log line naming the file."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        log.warning("%s: dropping a line that does not read as a metrics row: %.60s", path, line)
        return math.inf


def finish_crashed_run() -> None:
    """Marks the wandb run that a crash left open as failed (exit code 1), so that the dashboard shows the crash
    and the process's next job starts a run of its own."""
    if _OPEN["run"] is not None:
        _OPEN["run"].finish(exit_code=1)
        _OPEN["run"] = None
