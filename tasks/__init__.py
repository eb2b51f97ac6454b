"""Synthetic sequence tasks for gdn-exp, importable on their own (numpy and torch; HF datasets only for caching).

    import tasks
    batch = tasks.make_task("mqar", seed=0, num_examples=256, num_kv_pairs=8)
    batch["input_ids"], batch["labels"]        # LongTensor [256, seq_len]; labels are -100 where unscored
    batch["num_kv_pairs"]                      # per-example slice metadata, LongTensor [256]

    train = tasks.load_split("mqar", split="train", seed=0, num_examples=10_000, cache_dir="data_cache")

`labels[:, t]` is the token to predict from `input_ids[:, :t + 1]` (already shifted). Each task is one module with a
dataclass config (always vocab_size and seq_len, checked on construction) and a generator (config, seed,
num_examples) -> dict of int64 numpy arrays.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil

import numpy as np
import torch

from .common import IGNORE_INDEX
from .copy import CopyConfig, generate_copy
from .modular_arithmetic import ModularArithmeticConfig, generate_modular_arithmetic
from .mqar import MQARConfig, generate_mqar
from .needle import NeedleConfig, generate_needle
from .parity import ParityConfig, generate_parity
from .permutation import PermutationConfig, generate_permutation
from .reverse import ReverseConfig, generate_reverse
from .selective_copy import SelectiveCopyConfig, generate_selective_copy

TASKS = {
    "copy": (CopyConfig, generate_copy),
    "reverse": (ReverseConfig, generate_reverse),
    "mqar": (MQARConfig, generate_mqar),
    "selective_copy": (SelectiveCopyConfig, generate_selective_copy),
    "needle": (NeedleConfig, generate_needle),
    # state tracking (Grazzi et al. 2025; Merrill et al. 2024): variable lengths, tested longer than trained
    "parity": (ParityConfig, generate_parity),
    "modular_arithmetic": (ModularArithmeticConfig, generate_modular_arithmetic),
    "permutation": (PermutationConfig, generate_permutation),
}

SPLITS = ("train", "test")
SEEDS_PER_SPLIT = 2 ** 31  # split i owns seeds [i * SEEDS_PER_SPLIT, (i + 1) * SEEDS_PER_SPLIT)
CACHE_FORMAT = 2  # part of the cache key: bump when a generator's output changes for the same parameters


def config_class(name: str) -> type:
    """The dataclass holding task `name`'s parameters (field names, types and defaults)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name][0]


def make_config(name: str, **params):
    """Task `name`'s config with `params` over the defaults; ValueError on an unknown parameter or impossible size."""
    cls = config_class(name)
    known = [field.name for field in dataclasses.fields(cls)]
    for key in params:
        if key not in known:
            raise ValueError(f"unknown parameter {key!r} for task {name!r}; known: {', '.join(known)}")
    return cls(**params)


def at_length(name: str, length: int, **params) -> dict:
    """Task `name`'s parameters at seq_len = length: the fields its config lists in LENGTH_SCALED (e.g. copy_len)
    grow in proportion, the rest stay as given (e.g. mqar's num_kv_pairs: more distance, same load). A task with
    variable lengths (a min_len field: parity, ...) scores lengths from its training seq_len up to `length`, so a
    longer test holds only lengths it was not trained past (Grazzi et al.: trained on 3-40, tested on 40-256)."""
    config = make_config(name, **params)
    scaled = {**dataclasses.asdict(config), "seq_len": length}
    for field in getattr(config, "LENGTH_SCALED", ()):
        scaled[field] = getattr(config, field) * length // config.seq_len
    if "min_len" in scaled:
        scaled["min_len"] = config.seq_len
    return scaled


def task_seed(seed: int, split: str) -> int:
    """The generator seed of `split` for a user seed: train and test seeds come from disjoint ranges."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if not 0 <= seed < SEEDS_PER_SPLIT:
        raise ValueError(f"seed={seed} must be in [0, {SEEDS_PER_SPLIT})")
    return SPLITS.index(split) * SEEDS_PER_SPLIT + seed


def make_task(name: str, *, seed: int, num_examples: int, **params) -> dict[str, torch.Tensor]:
    """Generates `num_examples` examples of task `name` from `seed` (same seed, same data).

    Returns input_ids and labels, LongTensor [num_examples, seq_len], plus the task's slice metadata columns,
    LongTensor [num_examples] (e.g. num_kv_pairs for mqar).
    """
    config = make_config(name, **params)
    if num_examples < 0:
        raise ValueError(f"num_examples={num_examples} must be >= 0")
    generate = TASKS[name][1]
    return {column: torch.from_numpy(array) for column, array in generate(config, seed, num_examples).items()}


def load_split(name: str, *, split: str, seed: int, num_examples: int, cache_dir: str,
               **params) -> dict[str, torch.Tensor]:
    """make_task(name, seed=task_seed(seed, split), ...), cached as an Arrow dataset (HF datasets) on disk.

    The cache entry is cache_dir/<name>-<md5 of the task, its full config, the split seed and num_examples>/. The
    first job to need it generates it under an exclusive flock on <entry>.lock, and parallel jobs wait there, then
    read it; the OS drops the lock if that job dies. It is written to <entry>.tmp and renamed into place, so a reader
    never sees a half-written entry.
    """
    config = make_config(name, **params)
    split_seed = task_seed(seed, split)
    key = json.dumps({"task": name, "params": dataclasses.asdict(config), "seed": split_seed,
                      "num_examples": num_examples, "format": CACHE_FORMAT}, sort_keys=True)
    digest = hashlib.md5(key.encode()).hexdigest()
    path = os.path.join(cache_dir, f"{name}-{digest}")
    def write(path):
        _write_entry(make_task(name, seed=split_seed, num_examples=num_examples, **params), path, fingerprint=digest)

    write_once(path, write)
    try:
        return _read_entry(path)
    except (OSError, ValueError) as e:  # damaged since (a truncated .arrow file): the data is made again
        logging.getLogger(__name__).warning("task cache entry %s does not read (%s: %s); generating it again", path,
                                            type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
        write_once(path, write, replace=True)
        return _read_entry(path)


def write_once(path: str, write, *, replace: bool = False) -> None:
    """Calls write(path) unless the cache entry (a directory) `path` exists (or, with `replace`, after removing
    it). The first process to need it writes it under an exclusive flock on <path>.lock while the others wait
    there, then find it; the OS drops the lock if the writer dies. `write` must make `path` appear whole (write
    <path>.tmp, then rename it)."""
    if os.path.isdir(path) and not replace:  # a finished entry needs no lock: it only ever appears whole
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        lock = open(f"{path}.lock", "a")  # closing releases the lock; the file stays (unlinking it would race)
    except OSError as e:  # a read-only or foreign cache directory
        raise ValueError(f"cannot write the cache entry {path} (the cache directory, task_cache_dir): "
                         f"{e.strerror or e}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if replace:
            shutil.rmtree(path, ignore_errors=True)
        if not os.path.isdir(path):  # else the process that held the lock before this one wrote it
            write(path)


def _write_entry(batch: dict[str, torch.Tensor], path: str, fingerprint: str) -> None:
    """Saves `batch` as an HF datasets Arrow dataset at `path` (via path.tmp and a rename); call under the lock."""
    import datasets  # lazily: plain make_task should not pay for importing it
    import pyarrow

    # [N, seq_len] columns as fixed-size int64 lists: built straight from the buffer, read back as [N, seq_len]
    table = pyarrow.table({column: pyarrow.FixedSizeListArray.from_arrays(pyarrow.array(tensor.numpy().ravel()),
                                                                          tensor.shape[1])
                           if tensor.dim() == 2 else pyarrow.array(tensor.numpy())
                           for column, tensor in batch.items()})
    tmp_path = f"{path}.tmp"
    shutil.rmtree(tmp_path, ignore_errors=True)  # left by a job that died mid-write: only the lock holder writes
    # a given fingerprint, as datasets would otherwise hash every row for one (seconds at 100K x 512)
    with _no_progress_bars():
        datasets.Dataset(table, fingerprint=fingerprint).save_to_disk(tmp_path)
    os.rename(tmp_path, path)


@contextlib.contextmanager
def _no_progress_bars():
    """HF datasets' progress bars ("Saving the dataset (0/1 shards)") off for a cache write or read: a split is
    written once and read in well under a second, so they only clutter stderr. HF_DATASETS_DISABLE_PROGRESS_BARS,
    when set, still decides."""
    import datasets

    quiet = datasets.are_progress_bars_disabled() or datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None
    if not quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _read_entry(path: str) -> dict[str, torch.Tensor]:
    """The split saved at `path`: LongTensor [N, seq_len] for the fixed-size list columns, [N] for the others."""
    import datasets
    import pyarrow

    # the column buffers of the memory-mapped table as numpy, copied once: 5-10x faster than
    # with_format("torch")[:], which takes 1-2 s at 100K x 512 in a fresh process
    with _no_progress_bars():
        table = datasets.load_from_disk(path).data.table
    batch = {}
    for column in table.column_names:
        chunks = table.column(column).chunks  # the record batches the file was written in
        column_type = table.schema.field(column).type
        if pyarrow.types.is_fixed_size_list(column_type):
            values = np.concatenate([chunk.flatten().to_numpy() for chunk in chunks])
            values = values.reshape(table.num_rows, column_type.list_size)
        else:
            values = np.concatenate([chunk.to_numpy() for chunk in chunks])
        batch[column] = torch.from_numpy(values)  # concatenate's copy: writable, independent of the mapped file
    return batch


__all__ = ["TASKS", "SPLITS", "IGNORE_INDEX", "config_class", "make_config", "at_length", "task_seed", "make_task",
           "load_split", "write_once"]
