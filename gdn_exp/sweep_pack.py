"""Packs of a sweep: `hydra.launcher.pack_size=M` groups the jobs whose models have the same shapes and kernel
path, M at most per pack, and a worker trains each pack as one `ModelPack` (`train.pack.run_pack`): one set of
kernels for M models (docs/usage.md, "Packs"). pack_size 1 (the default) runs every job alone, as before.

Jobs pack together when their resolved configs are equal outside PACKABLE_KEYS, the keys that change no tensor's
shape nor the step's kernels, and when their run can be packed at all (`packable`).
"""
import json
import logging
from dataclasses import dataclass
from pathlib import Path


# Keys in which the models of one pack may differ (a key covers its sub-keys: "logger" is every logger.* key).
PACKABLE_KEYS = ("seed", "model.name", "model.init_std", "trainer.lr", "trainer.min_lr_ratio",
                 "trainer.lr_decay_steps", "trainer.warmup_steps", "trainer.weight_decay", "trainer.betas",
                 "trainer.grad_clip", "trainer.max_steps", "trainer.log_interval", "trainer.eval_interval",
                 "trainer.eval_batch_size", "trainer.target_accuracy", "trainer.checkpoint_interval",
                 "trainer.resume", "logger")


@dataclass
class PackJob:
    """Jobs (`sweep.Job`) that one worker trains as one pack. index: its first job's number (the launcher's handle)."""

    jobs: list

    @property
    def index(self) -> int:
        return self.jobs[0].index

    @property
    def name(self) -> str:
        return f"pack of {len(self.jobs)} (jobs {', '.join(str(job.index) for job in self.jobs)})"


def packable(config: dict) -> bool:
    """Whether a job can train in a pack: one process (no FSDP/DDP), the chunk form of the op (the Triton
    recurrent form has no vmap rule), no activation checkpointing, and a task whose splits stay on the device
    (task=lm streams packed documents)."""
    tc = config["trainer"]
    return (config["kernel"]["mode"] == "chunk" and tc["strategy"] in ("auto", "none")
            and not tc["activation_checkpointing"] and not config["task"].get("varlen", False)
            and config["task"]["name"] != "lm")


def pack_key(config: dict) -> str:
    """What the jobs of one pack share: the config outside PACKABLE_KEYS."""
    from gdn_exp.train.checkpoint import computed_by

    return json.dumps(computed_by(config, PACKABLE_KEYS), sort_keys=True, default=str)


def group_jobs(jobs: list, pack_size: int) -> list:
    """`jobs` as the units the workers take: PackJobs of up to pack_size jobs that can share a pack (in the
    sweep's order), and each other job alone."""
    if pack_size < 1:
        raise ValueError(f"hydra.launcher.pack_size={pack_size} must be >= 1")
    if pack_size == 1:
        return list(jobs)
    groups, units = {}, []
    for job in jobs:
        config = job.resolved()
        if packable(config):
            groups.setdefault(pack_key(config), []).append(job)
        else:
            units.append(job)
    for group in groups.values():
        for start in range(0, len(group), pack_size):
            part = group[start : start + pack_size]
            units.append(PackJob(part) if len(part) > 1 else part[0])
    return sorted(units, key=lambda unit: unit.index)


def run_pack_job(pack: PackJob, device: str, processes: int = 1) -> dict:
    """Trains a pack in this process (a sweep worker): {job index: results dict}. Each run dir is claimed as a solo
    job's is; one taken by another process fails its job only. Log records go to every member's cli.log; a job
    that was skipped or refused gets Hydra's files back as they were (as `sweep.run_one` does)."""
    from gdn_exp.rundir import RunDirInUse, claim, release, restore_records
    from gdn_exp.sweep import job_config
    from gdn_exp.train.pack import run_pack

    results, claimed = {}, []
    for job in pack.jobs:
        try:
            claim(Path(job.run_dir))
            claimed.append(job)
        except RunDirInUse as e:
            results[job.index] = {"status": "failed", "user_error": True, "error": str(e)}
    handlers = [logging.FileHandler(Path(job.run_dir) / "cli.log") for job in claimed]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logging.getLogger().addHandler(handler)
    try:
        cfgs = [job_config(job, device, processes) for job in claimed]
        if cfgs:
            trained = run_pack(cfgs, [Path(job.run_dir) for job in claimed],
                               skip_completed=cfgs[0].trainer.skip_completed)
            results.update({job.index: r for job, r in zip(claimed, trained)})
            for job, r in zip(claimed, trained):
                if r.get("skipped") or r.get("refused"):
                    restore_records(Path(job.run_dir), job.records)
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
        for job in claimed:
            release(Path(job.run_dir))
    return results
