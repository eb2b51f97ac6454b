"""Training: `run_job` wraps `train` with start-up checks, skip-if-done and failure isolation."""
import json
import logging
import traceback
from pathlib import Path

from omegaconf import OmegaConf

import tasks
from gdn_exp.config import task_params, validate
from gdn_exp.model import ModelConfig
from gdn_exp.ops import KernelUnavailableError, resolve_backend
from gdn_exp.train.loop import pick_device, train

log = logging.getLogger(__name__)

# Errors a user causes with a config value: reported as one line, never as a traceback.
USER_ERRORS = (ValueError, KernelUnavailableError)


def check_config(cfg) -> None:
    """Every check that can fail before training starts; raises one of USER_ERRORS naming the key."""
    validate(cfg)
    ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True)).validate()
    tasks.make_config(cfg.task.name, **task_params(cfg.task))
    resolve_backend(cfg.kernel.backend, pick_device(cfg.trainer.device))


def read_results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_job(cfg, run_dir: Path, *, skip_completed: bool = True) -> dict:
    """Checks, trains and writes <run_dir>/results.json; never raises for a failed run.

    A job whose results.json already says completed is skipped when `skip_completed` (a re-run sweep).
    A failure is recorded as status=failed with the error; `results["user_error"]` tells a config mistake
    (one line for the user) from a bug (with traceback in results.json and the log).
    """
    previous = read_results(run_dir)
    if skip_completed and previous.get("status") == "completed":
        log.info("skipping %s: results.json says completed", run_dir)
        return {**previous, "skipped": True}
    try:
        check_config(cfg)
        results = train(cfg, run_dir)
    except USER_ERRORS as e:
        results = {"status": "failed", "error": str(e), "user_error": True}
    except Exception as e:  # a bug or a crash: keep the traceback, let the other sweep jobs go on
        log.exception("run failed")
        results = {"status": "failed", "error": f"{type(e).__name__}: {e}", "user_error": False,
                   "traceback": traceback.format_exc()}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
