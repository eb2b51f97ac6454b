"""Checkpoints: everything needed to continue a run exactly, written atomically.

<run dir>/checkpoints/ holds
    latest.pt   one process or DDP: model, optimizer, scheduler, loop counters, RNG states, resolved config
                (rank 0 writes it; loadable with `torch.load(..., weights_only=True)`);
    latest.dcp/ FSDP: model and optimizer sharded across ranks (torch.distributed.checkpoint), plus
                train_state.pt with the rest; it resumes on any number of ranks, FSDP or not;
    best.pt     the full weights with the best test accuracy (always one file).
Batches are a pure function of (seed, step), so the step is the whole data position.
"""
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from gdn_exp.train.distributed import Distributed, is_sharded, unwrap

log = logging.getLogger(__name__)

LATEST_NAMES = ("latest.pt", "latest.dcp")   # full and sharded form
TRAIN_STATE = "train_state.pt"               # inside latest.dcp/: everything but the model and optimizer

# The config sections that must match for trainer.resume=true to pick up an earlier run.
IDENTITY_KEYS = ("model", "task", "kernel", "seed")


def save(path: Path, state: dict) -> None:
    """Writes `state` to `path` through a temporary file, so a kill mid-write never leaves a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_latest(checkpoint_dir: Path, model, optimizer, train_state: dict, dist_info: Distributed) -> None:
    """Writes latest.pt (rank 0) or, under FSDP, latest.dcp/ (all ranks write their shards).

    train_state: the rest of the run's state (scheduler, counters, rng, config, wandb_id), taken from rank 0.
    Call on every rank.
    """
    if dist_info.strategy != "fsdp":
        if dist_info.is_main:
            save(checkpoint_dir / "latest.pt", {"model": unwrap(model).state_dict(),
                                                "optimizer": optimizer.state_dict(), **train_state})
        return
    final, tmp, old = (checkpoint_dir / name for name in ("latest.dcp", "latest.dcp.tmp", "latest.dcp.old"))
    if dist_info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist_info.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if dist_info.is_main:  # swap in the complete new directory, so a kill never leaves a half-written one
        save(tmp / TRAIN_STATE, train_state)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist_info.barrier()


def load_latest(path: Path, model, optimizer) -> dict:
    """Restores model and optimizer from a latest.pt or latest.dcp/ in place; returns the rest of the state.

    A latest.dcp/ loads into any layout (FSDP on any number of ranks, DDP, one process); a latest.pt loads
    into one process or DDP, not into FSDP. Call on every rank.
    """
    if path.is_dir():
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        return load(path / TRAIN_STATE)
    state = load(path)
    if is_sharded(model):
        raise ValueError(f"trainer.resume: {path} is a full checkpoint (one process or DDP); resume it with "
                         f"trainer.strategy=ddp or none, or start the FSDP run from scratch")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state


def full_model_state(model) -> dict:
    """The whole model's weights as plain tensors, keyed as in LanguageModel (under FSDP gathered to CPU:
    call on every rank; rank 0's result is the complete one)."""
    if not is_sharded(model):
        return unwrap(model).state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resume(resume, run_dir: Path, config: dict) -> Optional[Path]:
    """The checkpoint that `trainer.resume` asks for, or None to start from scratch.

    resume: False; a path (a run dir, a latest.pt file or a latest.dcp dir); or True: this run dir's own
    latest checkpoint (a re-run sweep job), else the newest sibling run dir whose model, task, kernel and seed
    equal `config`'s.
    """
    if resume is False or resume is None:
        return None
    if resume is not True:
        path = Path(str(resume))
        if (path / "checkpoints").is_dir():
            path = latest_in(path / "checkpoints")
        if path is None or not (path.is_file() or (path / TRAIN_STATE).is_file()):
            raise ValueError(f"trainer.resume={resume}: no checkpoint there")
        return path
    own = latest_in(run_dir / "checkpoints")
    if own is not None:
        return own
    candidates = sorted(filter(None, (latest_in(d) for d in run_dir.parent.glob("*/checkpoints"))),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:  # mmap: only the config is read, not every candidate's weights
        saved = torch.load(path / TRAIN_STATE if path.is_dir() else path, mmap=True, weights_only=True)["config"]
        if all(saved.get(key) == config.get(key) for key in IDENTITY_KEYS):
            return path
    log.warning("trainer.resume=true: no earlier run with this model/task/kernel/seed under %s; "
                "starting from scratch", run_dir.parent)
    return None


def latest_in(checkpoint_dir: Path) -> Optional[Path]:
    """checkpoint_dir's latest.pt or latest.dcp/ (the newer if both), or None."""
    found = [checkpoint_dir / name for name in LATEST_NAMES if (checkpoint_dir / name).exists()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)
