"""Training: `run_job` wraps `train` with start-up checks, skip-if-done, failure isolation and, under torchrun,
one shared run directory for all ranks."""
import json
import logging
import math
import os
import shutil
import traceback
from pathlib import Path

from gdn_exp.config import validate, validate_batch_split
from gdn_exp.extras import have
from gdn_exp.ops import KernelUnavailableError, resolve_backend
from gdn_exp.rundir import Refused
from gdn_exp.train.loggers import finish_crashed_run
from gdn_exp.train.distributed import Distributed, distributed_job
from gdn_exp.train.loop import train
from gdn_exp.train.resume import decide

log = logging.getLogger(__name__)

# Errors a user causes with a config value: reported as one line, never as a traceback.
USER_ERRORS = (ValueError, KernelUnavailableError)


def check_config(cfg, dist_info: Distributed) -> None:
    """Every check that can fail before training starts; raises one of USER_ERRORS naming the key."""
    validate(cfg)
    validate_batch_split(cfg.trainer, dist_info.world_size)
    if cfg.task.get("num_train") is not None and cfg.task.num_train < cfg.trainer.batch_size:
        raise ValueError(f"task.num_train={cfg.task.num_train} is smaller than trainer.batch_size="
                         f"{cfg.trainer.batch_size}: every step would repeat examples")
    resolve_backend(cfg.kernel.backend, dist_info.device)
    if cfg.logger.name == "wandb" and cfg.logger.mode != "disabled" and not have("wandb"):
        raise ValueError("logger=wandb needs wandb, which is not installed: pip install wandb, or use logger=none")


def shared_run_dir(run_dir: Path, dist_info: Distributed) -> Path:
    """Rank 0's run dir, on every rank. Hydra makes a timestamped dir in each process; a non-zero rank's own
    dir, if it differs and holds nothing but Hydra's files, is removed, so a job leaves exactly one."""
    shared = dist_info.broadcast(run_dir)
    if shared != run_dir and run_dir.is_dir() and all(p.name in (".hydra", ".lock") or p.suffix == ".log"
                                                      for p in run_dir.iterdir()):
        shutil.rmtree(run_dir)
    return shared


def run_job(cfg, run_dir: Path, *, skip_completed: bool = True) -> dict:
    """Checks, trains and writes <run_dir>/results.json; never raises for a failed run.

    A job whose results.json already says completed is skipped when `skip_completed` (a re-run sweep), and one
    that `resume.decide` refuses returns refused=True: neither writes anything in run_dir. A failure is recorded
    as status=failed with the error; `results["user_error"]` tells a config mistake (one line for the user) from
    a bug (with traceback in results.json and the log).
    Under torchrun every rank calls this; all use rank 0's run_dir, and only rank 0 writes in it.
    """
    try:
        with distributed_job(cfg.trainer.device, cfg.trainer.strategy) as dist_info:
            return run_checked_job(cfg, shared_run_dir(run_dir, dist_info), dist_info, skip_completed)
    except USER_ERRORS as e:  # a bad trainer.device or trainer.strategy: no job could start
        return write_results(run_dir, {"status": "failed", "error": str(e), "user_error": True})


def run_checked_job(cfg, run_dir: Path, dist_info: Distributed, skip_completed: bool) -> dict:
    if not dist_info.is_main:  # one voice in the console
        logging.getLogger("gdn_exp").setLevel(logging.WARNING)
    decision = dist_info.broadcast(decision_of(cfg, run_dir, skip_completed) if dist_info.is_main else None)
    if decision is not None:
        return decision
    try:
        check_config(cfg, dist_info)
        results = train(cfg, run_dir, dist_info)
    except USER_ERRORS as e:
        results = {"status": "failed", "error": str(e), "user_error": True}
    except OSError as e:  # the disk (full, read-only): one line naming the file, the last checkpoint kept
        finish_crashed_run()
        results = {"status": "failed", "error": f"{type(e).__name__}: {e}", "user_error": True}
    except Exception as e:  # a bug or a crash: keep the traceback, let the other sweep jobs go on
        log.exception("run failed")
        finish_crashed_run()
        results = {"status": "failed", "error": f"{type(e).__name__}: {e}", "user_error": False,
                   "traceback": traceback.format_exc()}
    return write_results(run_dir, results) if dist_info.is_main else results


def decision_of(cfg, run_dir: Path, skip_completed: bool):
    """None to train; else what run_job returns without training: the skipped run's results, or a refusal."""
    try:
        return decide(run_dir, cfg, skip_completed)
    except Refused as e:
        return {"status": "failed", "error": str(e), "user_error": True, "refused": True}


def write_results(run_dir: Path, results: dict) -> dict:
    """Writes results.json as strict JSON (a value that is not finite, a diverged run's loss, becomes null),
    atomically: a kill or a full disk leaves the one before. A write that fails is one log line."""
    results = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in results.items()}
    path, tmp = run_dir / "results.json", run_dir / f".results.json.{os.getpid()}.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.error("cannot write %s: %s", path, e.strerror or e)
    return results
