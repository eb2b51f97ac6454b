"""One owner per run directory: a process takes <run dir>/.lock (flock) before it writes anything there, and a
second process that targets the same directory refuses with one line instead of interleaving its metrics,
checkpoints and results with the first one's. The OS drops the lock when its owner exits, even on a crash."""
import fcntl
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode

_HELD = {}  # run dir -> its open lock file, for as long as this process owns it


class RunDirInUse(ValueError):
    """Another process owns the run directory."""


def claim(run_dir: Path) -> None:
    """Makes this process the owner of run_dir (created if needed); RunDirInUse if another process is."""
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(run_dir) / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunDirInUse(f"run directory {run_dir} is in use by {owner}; give this run another hydra.run.dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"gdn-exp process {os.getpid()}")
    handle.flush()
    _HELD[key] = handle


def release(run_dir: Path) -> None:
    handle = _HELD.pop(str(Path(run_dir).resolve()), None)
    if handle is not None:
        handle.close()  # closing drops the flock


def exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def overridden(config) -> set:
    """The hydra.* keys set on the command line."""
    return {override.split("=")[0].lstrip("+~") for override in config.hydra.overrides.hydra}


def point_latest_at(directory: Path, *, pinned: bool) -> None:
    """Makes <parent>/latest a relative symlink to directory (outputs/runs/latest: the newest run, outputs/
    multiruns/latest: the newest sweep), replaced atomically; not for a directory the command line named."""
    if pinned:
        return
    link = directory.parent / "latest"
    tmp = directory.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(directory.name)
    os.replace(tmp, link)


class RunDirLock(Callback):
    """Hydra callback (conf/hydra/default.yaml): a single run checks its config (`config.validate`) and claims its
    directory before Hydra writes .hydra/ there; a job of a sequential sweep claims its own for as long as it
    runs. (The local launcher's workers claim their jobs' directories themselves, `gdn_exp.sweep`.) A directory
    that cannot be made ends the command with one line, before Hydra tries."""

    def on_run_start(self, config, **kwargs) -> None:
        from gdn_exp.config import validate

        run_dir = config.hydra.run.dir
        if int(os.environ.get("RANK", "0")) > 0:  # torchrun: the job's ranks share rank 0's directory
            return
        try:  # a config mistake (an impossible size) leaves no run directory behind
            validate(config)
        except ValueError as e:
            exit_with(str(e))
        try:
            claim(Path(run_dir))
        except RunDirInUse as e:
            exit_with(str(e))
        except OSError as e:  # Hydra would fail to make it with a traceback
            exit_with(f"cannot write the run directory hydra.run.dir={run_dir}: {e.strerror or e}")
        point_latest_at(Path(run_dir), pinned="hydra.run.dir" in overridden(config))

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        if config.hydra.launcher.get("dry_run"):  # Hydra's sweeper will write multirun.yaml: put back after
            path = Path(sweep_dir) / "multirun.yaml"
            self.multirun_yaml = (path, Path(sweep_dir).exists(), path.read_bytes() if path.is_file() else None)
        try:
            Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            exit_with(f"cannot write the sweep directory hydra.sweep.dir={sweep_dir}: {e.strerror or e}")
        if not config.hydra.launcher.get("dry_run"):
            point_latest_at(Path(sweep_dir), pinned="hydra.sweep.dir" in overridden(config))

    def on_multirun_end(self, config, **kwargs) -> None:
        """A dry run (hydra.launcher.dry_run) leaves the sweep directory as it found it."""
        if getattr(self, "multirun_yaml", None) is None:
            return
        path, existed, content = self.multirun_yaml
        if content is not None:
            path.write_bytes(content)
        else:
            path.unlink(missing_ok=True)
            if not existed:
                path.parent.rmdir()

    def on_job_start(self, config, **kwargs) -> None:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            claim(Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            release(Path(config.hydra.runtime.output_dir))
