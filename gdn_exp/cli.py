"""`gdn-exp`: the Hydra entry point. Composes conf/, runs one job, returns the sweep objective."""
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from gdn_exp.config import register_configs
from gdn_exp.rundir import FAILED_JOBS

log = logging.getLogger("gdn_exp")
CONF_DIR = Path(__file__).resolve().parent / "conf"  # inside the package, so a wheel has it (conf/ links here)
register_configs()

def main():
    """The `gdn-exp` command: a misspelled key stops here, in one line; everything else is Hydra's."""
    from gdn_exp.config import check_override_keys
    from gdn_exp.rundir import exit_with

    args = sys.argv[1:]
    if {"-m", "--multirun"} & set(args) and {"-c", "--cfg"} & set(args):  # Hydra's refusal is a traceback
        exit_with("--cfg and -m do not go together: to print one job's config, drop -m and give one value per key")
    try:
        check_override_keys(args, [path.name for path in sorted(CONF_DIR.iterdir()) if path.is_dir()])
    except ValueError as e:
        exit_with(str(e))
    try:
        run()
    except KeyboardInterrupt:  # a second Ctrl-C (train.loop.StopRequest): no traceback
        print("interrupted: the run stopped without a final checkpoint; its last one is in checkpoints/",
              file=sys.stderr)
        sys.exit(130)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def run(cfg):
    from gdn_exp.train import run_job  # imported here so --help and config errors stay fast

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.logger.name == "wandb" and cfg.logger.group is None and multirun:
        cfg.logger.group = Path(hydra_cfg.sweep.dir).name  # one wandb group per sweep
    try:
        results = run_job(cfg, run_dir, skip_completed=cfg.trainer.skip_completed)
    except KeyboardInterrupt:  # Ctrl-C before training started (from then on it checkpoints and stops)
        log.error("interrupted before training started: nothing to resume")
        sys.exit(130)
    if results["status"] != "completed":
        log.error("%s: %s", "error" if results["status"] == "failed" else results["status"], results["error"])
        if not multirun:  # a sweep goes on with its other jobs; a single run exits non-zero
            sys.exit(1)
        FAILED_JOBS.append(run_dir)  # the sweep exits non-zero at its end (rundir.RunDirLock)
    else:
        log.info("%s: test/accuracy %.4f, %d steps, %.1f s -> %s", results["status"],
                 results.get("test/accuracy", float("nan")), results.get("steps", 0),
                 results.get("wall_time_s", 0.0), run_dir)
    return results.get("test/accuracy")


if __name__ == "__main__":
    main()
