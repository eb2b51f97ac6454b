"""Checkpoints: one dict per file, written atomically, loadable with `torch.load(..., weights_only=True)`.

<run dir>/checkpoints/latest.pt holds everything needed to continue exactly (model, optimizer, scheduler,
loop counters, RNG states, resolved config); best.pt holds the weights with the best test accuracy.
Batches are a pure function of (seed, step), so the step is the whole data position.
"""
import logging
import os
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

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

    resume: False; a path (a run dir or a .pt file); or True: this run dir's own latest.pt (a re-run sweep
    job), else the newest sibling run dir whose model, task, kernel and seed equal `config`'s.
    """
    if resume is False or resume is None:
        return None
    if resume is not True:
        path = Path(str(resume))
        path = path / "checkpoints" / "latest.pt" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"trainer.resume={resume}: no checkpoint at {path}")
        return path
    own = run_dir / "checkpoints" / "latest.pt"
    if own.is_file():
        return own
    candidates = sorted(run_dir.parent.glob("*/checkpoints/latest.pt"), key=lambda p: p.stat().st_mtime,
                        reverse=True)
    for path in candidates:
        saved = load(path)["config"]
        if all(saved.get(key) == config.get(key) for key in IDENTITY_KEYS):
            return path
    log.warning("trainer.resume=true: no earlier run with this model/task/kernel/seed under %s; "
                "starting from scratch", run_dir.parent)
    return None
