"""The synthetic tasks of `tasks/` as gdn-exp tasks: their Hydra schema (the task's parameters plus split sizes
and longer test lengths), start-up checks and cached train/test splits.

task.test_lengths lists lengths beyond task.seq_len at which the run also tests: each gets its own test split,
"test@L" (the task at `tasks.at_length(name, L)`, num_test examples from the test seeds), which the trainer
evaluates beside "test" and logs as test/accuracy@L, test/loss@L, ...
"""
import dataclasses
from dataclasses import field
from typing import List

import tasks

# (num_train, num_test) of a synthetic task; others: DEFAULT_SPLIT_SIZES. The state-tracking tasks draw their
# lengths at random: more examples, so that the training set covers the lengths well and the test is precise.
SPLIT_SIZES = {"mqar": (20_000, 1_000), "parity": (100_000, 2_000), "modular_arithmetic": (100_000, 2_000),
               "permutation": (100_000, 1_000)}
DEFAULT_SPLIT_SIZES = (20_000, 500)
# task.test_lengths of a synthetic task (others: none): the state-tracking tasks exist to test length generalisation
TEST_LENGTHS = {"parity": [256], "modular_arithmetic": [256], "permutation": [256]}
SPLIT_KEYS = ("name", "num_train", "num_test", "test_lengths")  # the task node's keys that are not task parameters


def task_schema(name: str) -> type:
    """A dataclass for `task/<name>.yaml`: the task's own parameters (and defaults: tasks/<name>.py) plus split
    sizes and test lengths."""
    params = [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(tasks.config_class(name))]
    num_train, num_test = SPLIT_SIZES.get(name, DEFAULT_SPLIT_SIZES)
    test_lengths = TEST_LENGTHS.get(name, [])
    return dataclasses.make_dataclass(
        f"{name}_task",
        [("name", str, field(default=name)), ("num_train", int, field(default=num_train)),
         ("num_test", int, field(default=num_test)),
         ("test_lengths", List[int], field(default_factory=lambda: list(test_lengths)))] + params)


def task_params(task_cfg) -> dict:
    """The generator's keyword arguments from a composed `task` node (drops name, split sizes and test lengths)."""
    return {k: v for k, v in task_cfg.items() if k not in SPLIT_KEYS}


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
    for length in task_cfg.test_lengths:
        if not length > task_cfg.seq_len:
            raise ValueError(f"task.test_lengths={list(task_cfg.test_lengths)}: {length} is not longer than "
                             f"task.seq_len={task_cfg.seq_len}")
        try:
            tasks.at_length(task_cfg.name, length, **params)
        except ValueError as e:
            raise ValueError(f"task.test_lengths: at length {length}, {e}") from None


def load_synthetic(cfg) -> dict:
    """{"train": ..., "test": ..., "test@L": ... for each L in task.test_lengths}: the task generated from the
    run's seed (disjoint seeds per split), cached."""
    name, params = cfg.task.name, task_params(cfg.task)
    splits = {split: tasks.load_split(name, split=split, seed=cfg.seed, num_examples=size,
                                      cache_dir=cfg.task_cache_dir, **params)
              for split, size in (("train", cfg.task.num_train), ("test", cfg.task.num_test))}
    for length in cfg.task.test_lengths:
        splits[f"test@{length}"] = tasks.load_split(name, split="test", seed=cfg.seed,
                                                    num_examples=cfg.task.num_test, cache_dir=cfg.task_cache_dir,
                                                    **tasks.at_length(name, length, **params))
    return splits
