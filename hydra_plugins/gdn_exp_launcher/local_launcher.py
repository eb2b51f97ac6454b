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
    def __init__(self, jobs_per_gpu: int = 4, n_jobs: int = 1, gpus: Optional[int] = None, dry_run: bool = False,
                 pack_size: int = 1):
        self.jobs_per_gpu, self.n_jobs, self.gpus = jobs_per_gpu, n_jobs, gpus
        self.dry_run, self.pack_size = dry_run, pack_size
        self.config = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from gdn_exp.rundir import hydra_records
        from gdn_exp.sweep import dry_run_text, link_reused, plan_workers, reusable_jobs, run_jobs, summary
        from gdn_exp.sweep_pack import group_jobs

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        try:  # before any job is set up: a bad value leaves no directories behind
            workers = plan_workers(self.gpus if self.gpus is not None else _visible_gpus(), self.jobs_per_gpu,
                                   self.n_jobs)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        if self.dry_run:
            jobs = self.planned_jobs(job_overrides, initial_job_idx)
            log.info(dry_run_text(jobs, reusable_jobs(jobs, self.search_roots(), self.device_type())))
            return []
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        returns = []
        for offset, overrides in enumerate(job_overrides):
            index = initial_job_idx + offset
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{index}"
                sweep_config.hydra.job.num = index
            HydraConfig.instance().set_config(sweep_config)
            records = hydra_records(Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir))
            returns.append(run_job(hydra_context=self.hydra_context, task_function=record_job, config=sweep_config,
                                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
            returns[-1].return_value.records = records  # put back if the job is skipped or refused
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # run_job set up the last job's
        jobs = [ret.return_value for ret in returns]
        reused = reusable_jobs(jobs, self.search_roots(), self.device_type())
        units = group_jobs([job for job in jobs if job.index not in reused], self.pack_size)  # gdn_exp.sweep_pack
        log.info("%d jobs%s, %d at once on %s", len(jobs), f" in {len(units)} packs and solo jobs"
                 if len(units) < len(jobs) - len(reused) else "", len(workers), ", ".join(sorted(set(workers))))
        results = run_jobs(units, workers)
        results.update({job.index: link_reused(job, reused[job.index]) for job in jobs if job.index in reused})
        for ret, job in zip(returns, jobs):
            ret.return_value = (results.get(job.index) or {}).get("test/accuracy")  # the sweep objective
        text, code = summary(jobs, results)
        log.info(text)
        if code:
            sys.exit(code)
        return returns

    def planned_jobs(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        """The sweep's jobs as `gdn_exp.sweep.Job`s, as `record_job` makes them, but without their directories."""
        from gdn_exp.sweep import Job

        jobs = []
        for offset, overrides in enumerate(job_overrides):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            hydra = sweep_config.hydra
            task_config = OmegaConf.masked_copy(sweep_config, [key for key in sweep_config if key != "hydra"])
            jobs.append(Job(index=initial_job_idx + offset, config_yaml=OmegaConf.to_yaml(task_config),
                            run_dir=str(Path(str(hydra.sweep.dir)) / str(hydra.sweep.subdir)),
                            name=hydra.job.override_dirname or hydra.job.name, group=Path(str(hydra.sweep.dir)).name))
        return jobs

    def device_type(self) -> str:
        """Where the jobs would train: cuda with a GPU to use, else cpu."""
        return "cuda" if (self.gpus if self.gpus is not None else _visible_gpus()) > 0 else "cpu"

    def search_roots(self) -> list:
        """Where a job may find a run that completed with its config: beside this sweep (outputs/multiruns/) and
        among the single runs (outputs/runs/)."""
        hydra = self.config.hydra
        return [Path(str(hydra.sweep.dir)).parent, Path(str(hydra.run.dir)).parent]


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()
