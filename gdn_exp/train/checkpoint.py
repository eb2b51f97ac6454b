"""Checkpoints: everything needed to continue a run exactly, written atomically.

<run dir>/checkpoints/ holds
    latest.pt   one process or DDP: model, optimizer, scheduler, loop counters, RNG states, resolved config
                (rank 0 writes it; loadable with `torch.load(..., weights_only=True)`);
    previous.pt the latest.pt before it: a resume falls back to it when latest.pt is damaged;
    latest.dcp/ FSDP: model and optimizer sharded across ranks (torch.distributed.checkpoint), plus
                train_state.pt with the rest; it resumes on any number of ranks, FSDP or not;
    best.pt     the full weights with the best test accuracy (always one file);
    SHA256SUMS  the sha256 of each .pt file written here (sha256sum's format): a file whose bytes are not among
                them (torn, overwritten) is named and passed over for the one before it.
Batches are a pure function of (seed, step), so the step is the whole data position. Nothing loaded can run
code: .pt files load with weights_only=True, and a latest.dcp/ only through `SafeReader` and `SafePlanner`.
"""
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_files
import torch.distributed.checkpoint.metadata as dcp_metadata
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from gdn_exp.config import flatten_config
from gdn_exp.train.distributed import Distributed, is_sharded, unwrap

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"               # inside latest.dcp/: everything but the model and optimizer
SUMS = "SHA256SUMS"

# Config keys that a resumed run may change: they do not change what it computes (max_steps extends a run).
RESUMABLE_CHANGES = {"logger", "task_cache_dir", "model.name", "task.num_test", "trainer.max_steps",
                     "trainer.log_interval", "trainer.eval_interval", "trainer.eval_batch_size",
                     "trainer.checkpoint_interval", "trainer.target_accuracy", "trainer.resume",
                     "trainer.skip_completed", "trainer.device", "trainer.num_threads", "trainer.progress",
                     "trainer.cuda_graph", "trainer.strategy", "trainer.activation_checkpointing"}


def save(path: Path, state: dict) -> None:
    """Writes `state` to `path` through a temporary file of this process's own, so a kill mid-write never leaves
    a broken file, and records its sha256 in SHA256SUMS before it takes its name. A failed write (a full disk)
    leaves no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state, tmp)
        record_sums(path.parent, {path.name: sha256(Path(tmp))})
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and "file write failed" in str(e):  # torch's writer on a full disk
            raise OSError(f"cannot write {path} (is the disk full?)") from None
        raise


def set_default_mode(path) -> None:
    """Gives a file the mode a plain open() would (0666 less the umask: 0644 as a rule). mkstemp and safetensors
    make theirs 0600, which keeps a run's checkpoints and exports from the colleagues who share its outputs."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load(path: Path) -> dict:
    """A checkpoint file's contents, after `verify`."""
    verify(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_sums(directory: Path) -> Optional[dict]:
    """{file name: sha256} of directory/SHA256SUMS; None if there is none (a run from before it was written)."""
    try:
        lines = (directory / SUMS).read_text().splitlines()
    except FileNotFoundError:
        return None
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines if "  " in line)}


def record_sums(directory: Path, entries: dict) -> None:
    """Updates directory/SHA256SUMS with {file name: sha256}, written atomically."""
    sums = {**(read_sums(directory) or {}), **entries}
    tmp = directory / f".{SUMS}.{os.getpid()}.tmp"
    try:
        tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()) if digest))
        os.replace(tmp, directory / SUMS)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verify(path: Path) -> None:
    """ValueError unless `path`'s sha256 is one that its directory's SHA256SUMS records. The digests are matched
    by value, not by name: a kill between the rename of latest.pt to previous.pt and the update of SHA256SUMS
    leaves every complete file recorded. Without a SHA256SUMS (older runs) the file is not checked."""
    sums = read_sums(path.parent)
    if sums is not None and sha256(path) not in sums.values():
        raise ValueError("its sha256 is not the one recorded when it was written (a torn or overwritten file)")


def save_latest(checkpoint_dir: Path, model, optimizer, train_state: dict, dist_info: Distributed) -> None:
    """Writes latest.pt (rank 0) or, under FSDP, latest.dcp/ (all ranks write their shards).

    train_state: the rest of the run's state (scheduler, counters, rng, config, wandb_id), taken from rank 0.
    Call on every rank.
    """
    if dist_info.strategy != "fsdp":
        if dist_info.is_main:
            latest = checkpoint_dir / "latest.pt"
            if latest.is_file():  # kept until the new one is complete: a kill in between leaves one of them
                record_sums(checkpoint_dir, {"previous.pt": (read_sums(checkpoint_dir) or {}).get("latest.pt")})
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
        SafeReader(path).read_metadata()  # a planted .metadata: one line here, not a CheckpointException
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.load({"model": model_state, "optimizer": optimizer_state}, storage_reader=SafeReader(path),
                 planner=SafePlanner())
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        return load(path / TRAIN_STATE)
    state = load(path)
    if is_sharded(model):
        raise ValueError(f"trainer.resume: {path} is a full checkpoint (one process or DDP); resume it with "
                         f"trainer.strategy=ddp or none, or start the FSDP run from scratch")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a latest.dcp/.metadata, which torch.distributed.checkpoint pickles, allowing only the classes
    such metadata is made of (plain records, tensor sizes and dtypes, a path): a pickle that names anything else
    (a planted file calling os.system) is refused before any of it runs."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module, name):
        found = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        if (isinstance(found, type) and found.__module__ == module) or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which checkpoint metadata never holds")


class SafeReader(dcp_files.FileSystemReader):
    """torch.distributed.checkpoint's file reader with the metadata read by `SafeUnpickler`."""

    def read_metadata(self, *args, rank=None, **kwargs):
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            metadata = SafeUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise ValueError(f"{path} is not checkpoint metadata: {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(dcp.DefaultLoadPlanner):
    """The default load planner, with each non-tensor value (the optimizer's hyperparameters) checked to load
    with weights_only=True before torch's own load of the same bytes."""

    def load_bytes(self, read_item, value):
        torch.load(value, weights_only=True)  # raises for anything but plain data
        value.seek(0)
        super().load_bytes(read_item, value)


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

    resume: False; True: run_dir's own newest good checkpoint (a single run has been moved into the run it
    continues before this: `unfinished_runs`, `gdn_exp.rundir`), or None if it has none; or a path: a run dir,
    or a checkpoint file or latest.dcp dir. The run must have been trained with this config (RESUMABLE_CHANGES
    aside) and not past this trainer.max_steps, else ValueError saying what differs. A checkpoint that does not
    load or fails its checksum is named in one log line and passed over for the one before it; ValueError when
    none loads.
    """
    if resume is False or resume is None:
        return None
    path = run_dir if resume is True else Path(str(resume))
    what = f"trainer.resume={resume}: " + (f"{run_dir}'s run" if resume is True else "that run")
    candidates = checkpoints_in(path / "checkpoints") if (path / "checkpoints").is_dir() else \
        [] if resume is True else [path]
    for candidate in candidates:
        state = saved_state(candidate)
        if state is None:
            continue
        if "scheduler" not in state:
            raise ValueError(f"{what}: {candidate} holds only the model's weights; resume from its run directory "
                             f"or its latest.pt")
        differences = config_differences(state["config"], config)
        if differences:
            raise ValueError(f"{what} was trained with other settings: {'; '.join(differences)} "
                             f"(start a new run, or set them back)")
        if state["counters"]["step"] > config["trainer"]["max_steps"]:
            raise ValueError(f"{what} is at step {state['counters']['step']}, past trainer.max_steps="
                             f"{config['trainer']['max_steps']} (set at least that many)")
        return candidate
    if candidates:  # all damaged: starting over would overwrite them
        raise ValueError(f"trainer.resume={resume}: no checkpoint in {path} loads (each is named above); move its "
                         f"checkpoints/ away to start that run over")
    if resume is not True:
        raise ValueError(f"trainer.resume={resume}: no readable checkpoint there")
    return None


def unfinished_runs(parent: Path, config: dict) -> list:
    """The run dirs in `parent` that `trainer.resume=true` may continue, newest checkpoint first: not completed,
    trained with this config, and not already continued in another run dir (one that names their checkpoint as
    its resumed_from, as runs before in-place resumes did)."""
    runs = [d for d in parent.iterdir() if not d.is_symlink() and (d / "checkpoints").is_dir()] \
        if parent.is_dir() else []  # not outputs/runs/latest: a pointer to one of them
    results = {run: read_results(run) for run in runs}
    continued = {Path(str(r["resumed_from"])).resolve().parent.parent for run, r in results.items()
                 if r.get("resumed_from") and not Path(str(r["resumed_from"])).resolve().is_relative_to(run.resolve())}
    found = []
    for run in runs:
        if run.resolve() in continued or results[run].get("status") == "completed" or not same_config(run, config):
            continue
        for candidate in checkpoints_in(run / "checkpoints"):
            state = saved_state(candidate)
            if state is not None:
                if not config_differences(state["config"], config):
                    found.append((candidate.stat().st_mtime, run))
                break
    return [run for _, run in sorted(found, key=lambda item: item[0], reverse=True)]


def same_config(run_dir: Path, config: dict) -> bool:
    """Whether run_dir's config.yaml (the resolved config it trained with) is `config`, RESUMABLE_CHANGES
    aside; True when it has none that reads (its checkpoint's config decides): a quick look before hashing
    checkpoints."""
    try:
        recorded = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    except Exception:  # missing, torn, not YAML
        return True
    if not isinstance(recorded, dict):
        return True
    # config.yaml records what trainer.precision=auto chose (the checkpoint keeps the composed value): not compared
    recorded, config = ({**c, "trainer": {k: v for k, v in c.get("trainer", {}).items() if k != "precision"}}
                        for c in (recorded, config))
    return not config_differences(recorded, config)


def checkpoints_in(checkpoint_dir: Path) -> list:
    """checkpoint_dir's resumable checkpoints, newest first: latest.pt and latest.dcp/ (the newer first), then
    previous.pt."""
    latest = sorted((checkpoint_dir / name for name in ("latest.pt", "latest.dcp") if (checkpoint_dir / name).exists()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return latest + [p for p in [checkpoint_dir / "previous.pt"] if p.is_file()]


def saved_state(path: Path) -> Optional[dict]:
    """A checkpoint's contents memory-mapped (its config and counters are read, not its weights), or None (with
    one log line naming it) if it does not load or fails its checksum."""
    file = path / TRAIN_STATE if path.is_dir() else path
    try:
        verify(file)
        return torch.load(file, mmap=True, weights_only=True)
    except Exception as e:  # truncated, overwritten, not a checkpoint, written by something else
        passed_over(path, e)
        return None


def passed_over(path: Path, error: Exception) -> None:
    log.warning("skipping checkpoint %s: it does not load (%s: %s)", path, type(error).__name__,
                str(error).splitlines()[0][:120] if str(error) else "")


def load_weights(run_dir: Path) -> tuple:
    """(path, contents) of a run's best readable weights: checkpoints/best.pt, else latest.pt, else previous.pt.
    A file that does not load or fails its checksum is named in one log line and passed over; ValueError when
    none loads (a run that failed before its first checkpoint)."""
    for name in ("best.pt", "latest.pt", "previous.pt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            try:
                return path, load(path)
            except Exception as e:  # truncated, overwritten, not a checkpoint
                passed_over(path, e)
    raise ValueError(f"{run_dir}: no readable checkpoints/best.pt, latest.pt or previous.pt")


def read_results(run_dir: Path) -> dict:
    """run_dir's results.json, or {} if it has none; one that is not a JSON object (torn, empty, `null`) is named
    in one log line and read as {}."""
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: it does not read as JSON (%s)", path, e)
        return {}
    if not isinstance(results, dict):
        log.warning("ignoring %s: it holds %s, not a run's results", path, json.dumps(results)[:40])
        return {}
    return results


def computed_by(config: dict, ignored=RESUMABLE_CHANGES) -> dict:
    """The flattened config without the keys in `ignored` (and the keys below them): what decides a run's
    computation."""
    return {k: v for k, v in flatten_config(config).items()
            if not any(k == key or k.startswith(key + ".") for key in ignored)}


def config_differences(saved: dict, config: dict) -> list:
    """'key: saved -> now' for each config key outside RESUMABLE_CHANGES whose value differs."""
    saved_flat, now_flat = computed_by(saved), computed_by(config)
    keys = sorted(saved_flat.keys() | now_flat.keys())
    return [f"{k}: {saved_flat.get(k)} -> {now_flat.get(k)}" for k in keys if saved_flat.get(k) != now_flat.get(k)]
