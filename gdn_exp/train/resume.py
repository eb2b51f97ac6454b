"""What an invocation may do with a run directory, decided before it writes anything there: train (from scratch or
from the run's checkpoint), skip it (it completed before), or refuse in one line. A skipped or refused invocation
leaves the directory as it was, so its records always describe what ran.

A stopped run is continued in its own directory: `trainer.resume=true` on a single run picks the newest unfinished
run with the same config in the run's parent directory whose lock is free (`gdn_exp.rundir` moves Hydra's run
dir there before Hydra writes anything); `trainer.resume=<run dir>` continues that one in place.
"""
import logging
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from gdn_exp.config import validate
from gdn_exp.rundir import Refused
from gdn_exp.train.checkpoint import checkpoints_in, find_resume, read_results

log = logging.getLogger(__name__)


def decide(run_dir: Path, cfg, skip_completed: bool) -> Optional[dict]:
    """None to train in run_dir, or its results (with skipped=True) when it completed before and
    `skip_completed`; a completed run is continued instead when trainer.resume asks for more steps than it ran
    with. Raises Refused for a resume that does not fit the run (other settings, fewer steps than its checkpoint,
    a weights-only file) and for a run without trainer.resume into a directory that holds an unfinished run's
    checkpoints (it would start that run over from step 0).

    cfg: the job's config (without the hydra node). One with a bad value is left to run_job's checks, which
    name it in one line.
    """
    try:
        validate(cfg)
    except ValueError:
        return None
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    previous = read_results(run_dir)
    resume, max_steps = config["trainer"]["resume"], config["trainer"]["max_steps"]
    if previous.get("status") == "completed" and skip_completed:
        ran_with = saved_max_steps(run_dir)
        if not (resume and max_steps > ran_with):
            hint = f"; add trainer.resume=true to continue it to trainer.max_steps={max_steps}" \
                if max_steps > ran_with else ""
            log.info("skipping %s: results.json says completed (%s steps)%s", run_dir, previous.get("steps"), hint)
            return {**previous, "skipped": True}
    if not resume and previous.get("status") != "completed" and checkpoints_in(run_dir / "checkpoints"):
        raise Refused(f"{run_dir} holds the checkpoints of a run that did not complete: add trainer.resume=true to "
                      f"continue it, or give this run another directory")
    try:
        find_resume(resume, run_dir, config)
    except ValueError as e:
        raise Refused(str(e)) from None
    return None


def saved_max_steps(run_dir: Path) -> float:
    """The trainer.max_steps that run_dir's run trained with (its config.yaml); infinity if unknown."""
    try:
        return OmegaConf.load(run_dir / "config.yaml").trainer.max_steps
    except Exception:  # missing or unreadable: never continue a completed run on a guess
        return float("inf")
