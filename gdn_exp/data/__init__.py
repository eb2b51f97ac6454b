"""Where each task's data comes from: `TASKS` maps every `task=NAME` to its source.

    source = task_source(cfg.task.name)
    source.schema           # the dataclass that types the `task` node (Hydra schema group schema/task)
    source.check(cfg.task)  # start-up checks: ValueError naming the key
    source.load(cfg)        # {"train": ..., "test": ...}, each {"input_ids", "labels", ...}: LongTensor [N, seq_len],
                            # or (task=lm's train split) a `TokenRows` of a memory-mapped token file, read per batch

The synthetic tasks of `tasks/` (generated, `synthetic.py`) and language modelling on text (`lm.py`: local files
or a Hugging Face dataset, tokenized once into a cached token file).
"""
from dataclasses import dataclass
from typing import Callable

import tasks

from .lm import (CORPUS_PATH, ByteTokenizer, LMTaskConfig, PackedDocuments, TokenRows, check_lm_config,
                 document_cu_seqlens, load_lm_splits, make_tokenizer)
from .synthetic import check_synthetic, load_synthetic, task_params, task_schema


@dataclass(frozen=True)
class TaskSource:
    schema: type
    check: Callable        # (task node) -> None
    load: Callable         # (full config) -> {"train": ..., "test": ...}
    text: bool = False     # real text: evaluations add perplexity; task.varlen packs documents


TASKS = {name: TaskSource(task_schema(name), check_synthetic, load_synthetic) for name in tasks.TASKS}
TASKS["lm"] = TaskSource(LMTaskConfig, check_lm_config,
                         lambda cfg: load_lm_splits(cfg.task, cache_dir=cfg.task_cache_dir), text=True)


def task_source(name: str) -> TaskSource:
    if name not in TASKS:
        raise ValueError(f"task.name={name} is not a task; choose one with task=NAME ({', '.join(TASKS)})")
    return TASKS[name]


__all__ = ["CORPUS_PATH", "TASKS", "ByteTokenizer", "LMTaskConfig", "PackedDocuments", "TaskSource", "TokenRows",
           "check_lm_config", "document_cu_seqlens", "load_lm_splits", "make_tokenizer", "task_params", "task_schema",
           "task_source"]
