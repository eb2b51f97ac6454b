"""The synthetic tasks of `tasks/` as gdn-exp tasks: their Hydra schema (the task's parameters plus split sizes),
start-up checks and cached train/test splits."""
import dataclasses
from dataclasses import field

import tasks

SPLIT_SIZES = {"mqar": (20_000, 1_000)}  # (num_train, num_test) of a synthetic task; others: DEFAULT_SPLIT_SIZES
DEFAULT_SPLIT_SIZES = (20_000, 500)


def task_schema(name: str) -> type:
    """A dataclass for `task/<name>.yaml`: the task's own parameters (and defaults: tasks/<name>.py) plus split
    sizes."""
    params = [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(tasks.config_class(name))]
    num_train, num_test = SPLIT_SIZES.get(name, DEFAULT_SPLIT_SIZES)
    return dataclasses.make_dataclass(
        f"{name}_task",
        [("name", str, field(default=name)), ("num_train", int, field(default=num_train)),
         ("num_test", int, field(default=num_test))] + params)


def task_params(task_cfg) -> dict:
    """The generator's keyword arguments from a composed `task` node (drops name and split sizes)."""
    return {k: v for k, v in task_cfg.items() if k not in ("name", "num_train", "num_test")}


def check_synthetic(task_cfg) -> None:
    """Split sizes and the task's own checks (tasks/<name>.py), their `seq_len=...` named as `task.seq_len=...`."""
    for key in ("num_train", "num_test"):
        if not task_cfg[key] >= 1:
            raise ValueError(f"task.{key}={task_cfg[key]} must be >= 1")
    params = task_params(task_cfg)
    try:
        tasks.make_config(task_cfg.name, **params)
    except ValueError as e:
        message = str(e)
        if message.split("=", 1)[0] in params:
            raise ValueError(f"task.{message}") from None
        raise


def load_synthetic(cfg) -> dict:
    """{"train": ..., "test": ...}: the task generated from the run's seed (disjoint seeds per split), cached."""
    params = task_params(cfg.task)
    return {split: tasks.load_split(cfg.task.name, split=split, seed=cfg.seed, num_examples=size,
                                    cache_dir=cfg.task_cache_dir, **params)
            for split, size in (("train", cfg.task.num_train), ("test", cfg.task.num_test))}
