"""`gdn-exp`: the Hydra entry point. Composes conf/, runs one job, returns the sweep objective."""
import fcntl
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from gdn_exp.config import register_configs

log = logging.getLogger("gdn_exp")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the repository's conf/ (an editable install)
GPU_LOCK_DIR = Path(tempfile.gettempdir()) / "gdn-exp-gpu-locks"  # machine-wide: concurrent sweeps share it
register_configs()


@contextmanager
def claim_gpu(num_gpus: int, lock_dir: Path, poll_s: float = 5.0):
    """Yields the index of a GPU that no other gdn-exp job on this machine holds, and holds it until exit.

    Each GPU is a lock file (flock): a job takes the first free one and waits while all are taken. The OS
    drops the lock when the job's process ends, even on a crash, so a lock never outlives its job.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting_logged = False
    while True:
        for index in range(num_gpus):
            lock_file = open(lock_dir / f"gpu{index}.lock", "w")
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.close()
                continue
            try:
                yield index
            finally:
                lock_file.close()  # closing releases the flock
            return
        if not waiting_logged:
            log.info("all %d GPUs are taken by other gdn-exp jobs; waiting for one", num_gpus)
            waiting_logged = True
        time.sleep(poll_s)


@contextmanager
def job_device(cfg, multirun: bool):
    """In a sweep on a machine with several GPUs and trainer.device=auto, this job runs on a GPU of its own
    (trainer.device=cuda:N for the run); otherwise, and under torchrun (a job over all GPUs), nothing changes."""
    import torch

    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multirun and not under_torchrun and cfg.trainer.device == "auto" and torch.cuda.device_count() > 1:
        with claim_gpu(torch.cuda.device_count(), GPU_LOCK_DIR) as index:
            cfg.trainer.device = f"cuda:{index}"
            yield
    else:
        yield


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg):
    from gdn_exp.train import run_job  # imported here so --help and config errors stay fast

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.logger.name == "wandb" and cfg.logger.group is None and multirun:
        cfg.logger.group = Path(hydra_cfg.sweep.dir).name  # one wandb group per sweep
    with job_device(cfg, multirun):
        results = run_job(cfg, run_dir, skip_completed=cfg.trainer.skip_completed)
    if results["status"] == "failed":
        log.error("error: %s", results["error"])
        if not multirun:  # a sweep goes on with its other jobs; a single run exits non-zero
            sys.exit(1)
    else:
        log.info("%s: test/accuracy %.4f, %d steps, %.1f s -> %s", results["status"],
                 results.get("test/accuracy", float("nan")), results.get("steps", 0),
                 results.get("wall_time_s", 0.0), run_dir)
    return results.get("test/accuracy")


if __name__ == "__main__":
    main()
