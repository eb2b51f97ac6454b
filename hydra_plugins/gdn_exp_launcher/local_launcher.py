"""`hydra/launcher=local`: the jobs of a sweep on this machine, several per GPU (`gdn_exp.sweep`).

Hydra only finds launchers in the `hydra_plugins` package, so this adapter lives here: it lets Hydra set up each
job as usual (config, run directory, .hydra/ files) through a task function that only records the job, then
trains them all with `gdn_exp.sweep.run_jobs`, prints a summary and exits non-zero if a job failed.
"""
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("gdn_exp.sweep")


def record_job(cfg: DictConfig):
    """The task function while Hydra sets a job up: the job as `gdn_exp.sweep.Job`, nothing trained."""
    from gdn_exp.sweep import Job

    hydra_cfg = HydraConfig.get()
    return Job(index=hydra_cfg.job.num, config_yaml=OmegaConf.to_yaml(cfg), run_dir=hydra_cfg.runtime.output_dir,
               name=hydra_cfg.job.override_dirname or hydra_cfg.job.name, group=Path(hydra_cfg.sweep.dir).name)


class LocalLauncher(Launcher):
    def __init__(self, jobs_per_gpu: int = 4, n_jobs: int = 1, gpus: Optional[int] = None, pack_size: int = 1):
        self.jobs_per_gpu, self.n_jobs, self.gpus, self.pack_size = jobs_per_gpu, n_jobs, gpus, pack_size
        self.config = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from gdn_exp.sweep import plan_workers, run_jobs, summary
        from gdn_exp.sweep_pack import group_jobs

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        returns = []
        for offset, overrides in enumerate(job_overrides):
            index = initial_job_idx + offset
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{index}"
                sweep_config.hydra.job.num = index
            HydraConfig.instance().set_config(sweep_config)
            returns.append(run_job(hydra_context=self.hydra_context, task_function=record_job, config=sweep_config,
                                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # run_job set up the last job's
        jobs = [ret.return_value for ret in returns]
        workers = plan_workers(self.gpus if self.gpus is not None else _visible_gpus(), self.jobs_per_gpu,
                               self.n_jobs)
        units = group_jobs(jobs, self.pack_size)  # packs of same-shape jobs (gdn_exp.sweep_pack)
        log.info("%d jobs%s, %d at once on %s", len(jobs), f" in {len(units)} packs and solo jobs"
                 if len(units) < len(jobs) else "", len(workers), ", ".join(sorted(set(workers))))
        results = run_jobs(units, workers)
        for ret, job in zip(returns, jobs):
            ret.return_value = (results.get(job.index) or {}).get("test/accuracy")  # the sweep objective
        text, code = summary(jobs, results)
        log.info(text)
        if code:
            sys.exit(code)
        return returns


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()
