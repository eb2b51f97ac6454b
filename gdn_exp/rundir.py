"""One owner per run directory: a process takes <run dir>/.lock (flock) before it writes anything there, and a
second process that targets the same directory refuses with one line instead of interleaving its metrics,
checkpoints and results with the first one's. The OS drops the lock when its owner exits, even on a crash."""
import copy
import fcntl
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

_HELD = {}  # run dir -> its open lock file, for as long as this process owns it
FAILED_JOBS = []  # run dirs of the jobs this process ran that did not complete (a sweep in this process)


class RunDirInUse(ValueError):
    """Another process owns the run directory."""


class Refused(ValueError):
    """This invocation must leave the run directory as it is (`gdn_exp.train.resume.decide`); the message says
    why, in one line."""


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


HYDRA_RECORDS = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")


def hydra_records(run_dir: Path) -> dict:
    """{Hydra's record file: its bytes, or None where there is none} in run_dir, taken before Hydra writes a sweep
    job's: a job that is then skipped or refused puts them back (`restore_records`), so its records still say
    what ran there."""
    return {name: (run_dir / name).read_bytes() if (run_dir / name).is_file() else None for name in HYDRA_RECORDS}


def restore_records(run_dir: Path, records: dict) -> None:
    for name, data in records.items():
        if data is None:
            (run_dir / name).unlink(missing_ok=True)
        else:
            (run_dir / name).write_bytes(data)


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


def continue_in_place(config) -> None:
    """Moves a single run that resumes into the run it continues (hydra.run.dir), and claims that directory:
    with trainer.resume=<run dir>, that one; with trainer.resume=true and a run dir without checkpoints (a new
    one), the newest unfinished run with this config beside it whose lock is free (`checkpoint.unfinished_runs`).
    A run that another process trains is passed over with one line."""
    from gdn_exp.train.checkpoint import unfinished_runs

    resume, run_dir = config.trainer.resume, Path(config.hydra.run.dir)
    if resume is True and not (run_dir / "checkpoints").is_dir():
        candidates = unfinished_runs(run_dir.parent, OmegaConf.to_container(job_config(config), resolve=True,
                                                                           enum_to_str=True))
        if not candidates:
            print(f"trainer.resume=true: no unfinished run with this config in {run_dir.parent}; starting from "
                  f"scratch", file=sys.stderr)
    elif isinstance(resume, str) and (Path(resume) / "checkpoints").is_dir():
        candidates = [Path(resume)]
    else:
        return
    for candidate in candidates:
        try:
            claim(candidate)
        except RunDirInUse as e:
            print(f"trainer.resume: not continuing {candidate}: {e}", file=sys.stderr)
            continue
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(candidate)
        print(f"trainer.resume: continuing {candidate} in place", file=sys.stderr)
        return


def job_config(config):
    """The config that the job will see: `config` without the hydra node."""
    job = copy.deepcopy(config)
    with read_write(job), open_dict(job):
        del job["hydra"]
    return job


class RunDirLock(Callback):
    """Hydra callback (conf/hydra/default.yaml): a single run checks its config (`config.validate`: a mistake leaves
    no run directory) and claims its directory before Hydra writes .hydra/ there, after moving into the run it
    continues (`continue_in_place`), and ends there, with one line and nothing written, when
    `gdn_exp.train.resume.decide` skips or refuses it. A job of a sequential sweep claims its own for as long as
    it runs. (The local launcher's workers claim their jobs' directories themselves, `gdn_exp.sweep`.) A directory
    that cannot be made ends the command with one line, before Hydra tries."""

    def on_run_start(self, config, **kwargs) -> None:
        from gdn_exp.config import validate

        if int(os.environ.get("RANK", "0")) > 0:  # torchrun: the job's ranks share rank 0's directory
            return
        if not str(config.hydra.run.dir).strip():  # Hydra would write the run into the working directory
            exit_with("hydra.run.dir is empty: give the run a directory")
        try:  # a config mistake (an impossible size) leaves no run directory behind
            validate(config)
        except ValueError as e:
            exit_with(str(e))
        try:
            from gdn_exp.train.resume import decide

            continue_in_place(config)
            run_dir = Path(config.hydra.run.dir)
            claim(run_dir)
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # several ranks decide together, in run_job
                if decide(run_dir, job_config(config), config.trainer.skip_completed) is not None:
                    sys.exit(0)
        except (RunDirInUse, Refused) as e:
            exit_with(str(e))
        except OSError as e:  # Hydra would fail to make it with a traceback
            exit_with(f"cannot write the run directory hydra.run.dir={config.hydra.run.dir}: {e.strerror or e}")
        except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing was written
            print("interrupted before training started: nothing to resume", file=sys.stderr)
            sys.exit(130)
        point_latest_at(Path(config.hydra.run.dir), pinned="hydra.run.dir" in overridden(config))

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
        if getattr(self, "multirun_yaml", None) is not None:
            path, existed, content = self.multirun_yaml
            if content is not None:
                path.write_bytes(content)
            else:
                path.unlink(missing_ok=True)
                if not existed:
                    path.parent.rmdir()
        if FAILED_JOBS:  # a sweep run in this process (hydra/launcher=basic): exit 1 as the local launcher does
            exit_with(f"{len(FAILED_JOBS)} job(s) did not complete: {', '.join(map(str, FAILED_JOBS))}")

    def on_job_start(self, config, **kwargs) -> None:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            claim(Path(config.hydra.runtime.output_dir))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            release(Path(config.hydra.runtime.output_dir))
