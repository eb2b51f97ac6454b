"""Checkpoints: everything needed to continue a run exactly, written atomically.

<run dir>/checkpoints/ holds
    latest.pt   one process or DDP: model, optimizer, scheduler, loop counters, RNG states, resolved config
                (rank 0 writes it; loadable with `torch.load(..., weights_only=True)`);
    previous.pt the latest.pt before it: a resume falls back to it when latest.pt is damaged;
    latest.dcp/ FSDP: model and optimizer sharded across ranks (torch.distributed.checkpoint), plus
                train_state.pt with the rest; it resumes on any number of ranks, FSDP or not;
    best.pt     the full weights with the best test accuracy (always one file).
Batches are a pure function of (seed, step), so the step is the whole data position.
"""
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from gdn_exp.config import flatten_config
from gdn_exp.train.distributed import Distributed, is_sharded, unwrap

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"               # inside latest.dcp/: everything but the model and optimizer

# Config keys that a resumed run may change: they do not change what it computes (max_steps extends a run).
RESUMABLE_CHANGES = {"logger", "task_cache_dir", "model.name", "task.num_test", "trainer.max_steps",
                     "trainer.log_interval", "trainer.eval_interval", "trainer.eval_batch_size",
                     "trainer.checkpoint_interval", "trainer.target_accuracy", "trainer.resume",
                     "trainer.skip_completed", "trainer.device", "trainer.num_threads", "trainer.progress",
                     "trainer.cuda_graph", "trainer.strategy", "trainer.activation_checkpointing"}


def save(path: Path, state: dict) -> None:
    """Writes `state` to `path` through a temporary file of this process's own, so a kill mid-write never leaves
    a broken file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    torch.save(state, tmp)
    set_default_mode(tmp)
    os.replace(tmp, path)


def set_default_mode(path) -> None:
    """Gives a file the mode a plain open() would (0666 less the umask: 0644 as a rule). mkstemp and safetensors
    make theirs 0600, which keeps a run's checkpoints and exports from the colleagues who share its outputs."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_latest(checkpoint_dir: Path, model, optimizer, train_state: dict, dist_info: Distributed) -> None:
    """Writes latest.pt (rank 0) or, under FSDP, latest.dcp/ (all ranks write their shards).

    train_state: the rest of the run's state (scheduler, counters, rng, config, wandb_id), taken from rank 0.
    Call on every rank.
    """
    if dist_info.strategy != "fsdp":
        if dist_info.is_main:
            latest = checkpoint_dir / "latest.pt"
            if latest.is_file():  # kept until the new one is complete: a kill in between leaves one of them
                os.replace(latest, checkpoint_dir / "previous.pt")
            save(latest, {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), **train_state})
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

    resume: False; a path (a run dir, or a checkpoint file or latest.dcp dir), whose run must have been trained
    with this config (RESUMABLE_CHANGES aside), else ValueError naming the keys that differ; or True: this run
    dir's own newest readable checkpoint (a re-run sweep job), else the newest one of a sibling run dir that did
    not complete and was trained with this config. A checkpoint that does not load is named in one log line and
    passed over.
    """
    if resume is False or resume is None:
        return None
    if resume is not True:
        path = Path(str(resume))
        candidates = checkpoints_in(path / "checkpoints") if (path / "checkpoints").is_dir() else [path]
        found = newest_readable(candidates, config, f"trainer.resume={resume}: that run")
        if found is None:
            raise ValueError(f"trainer.resume={resume}: no readable checkpoint there")
        return found
    own = newest_readable(checkpoints_in(run_dir / "checkpoints"), config, f"trainer.resume=true: {run_dir}'s run")
    if own is not None:
        return own
    siblings = [d for d in run_dir.parent.iterdir() if d != run_dir and (d / "checkpoints").is_dir()
                and not completed(d)] if run_dir.parent.is_dir() else []
    candidates = sorted((c for d in siblings for c in checkpoints_in(d / "checkpoints")),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        saved = saved_config(candidate)
        if saved is not None and not config_differences(saved, config):
            return candidate
    log.warning("trainer.resume=true: no unfinished run with this config under %s; starting from scratch",
                run_dir.parent)
    return None


def newest_readable(candidates: list, config: dict, what: str) -> Optional[Path]:
    """The first of candidates that loads, or None; ValueError naming the keys that differ (`what` was trained
    with other settings) if that one's config is not `config`."""
    for candidate in candidates:
        saved = saved_config(candidate)
        if saved is not None:
            differences = config_differences(saved, config)
            if differences:
                raise ValueError(f"{what} was trained with other settings: {'; '.join(differences)} "
                                 f"(start a new run, or set them back)")
            return candidate
    return None


def checkpoints_in(checkpoint_dir: Path) -> list:
    """checkpoint_dir's resumable checkpoints, newest first: latest.pt and latest.dcp/ (the newer first), then
    previous.pt."""
    latest = sorted((checkpoint_dir / name for name in ("latest.pt", "latest.dcp") if (checkpoint_dir / name).exists()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return latest + [p for p in [checkpoint_dir / "previous.pt"] if p.is_file()]


def saved_config(path: Path) -> Optional[dict]:
    """The resolved config stored in a checkpoint, or None (with one log line naming it) if it does not load."""
    try:  # mmap: only the config is read, not the weights
        return torch.load(path / TRAIN_STATE if path.is_dir() else path, mmap=True, weights_only=True)["config"]
    except Exception as e:  # truncated, not a checkpoint, written by something else
        log.warning("skipping checkpoint %s: it does not load (%s: %s)", path, type(e).__name__,
                    str(e).splitlines()[0][:120] if str(e) else "")
        return None


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def config_differences(saved: dict, config: dict) -> list:
    """'key: saved -> now' for each config key outside RESUMABLE_CHANGES whose value differs."""
    saved_flat, now_flat = flatten_config(saved), flatten_config(config)
    keys = sorted(k for k in saved_flat.keys() | now_flat.keys()
                  if not any(k == c or k.startswith(c + ".") for c in RESUMABLE_CHANGES))
    return [f"{k}: {saved_flat.get(k)} -> {now_flat.get(k)}" for k in keys if saved_flat.get(k) != now_flat.get(k)]
