"""The jobs of a sweep on this machine: jobs_per_gpu worker processes per GPU (or n_jobs without a GPU), each
training one job at a time, taking the next as soon as it is free.

A small job's step is one CUDA graph replay (`train.step`), so one job alone keeps a GPU busy: jobs in separate
processes do not overlap on the GPU (each process has its own CUDA context, and the GPU time-slices between
contexts: 1, 4 and 8 processes of the MQAR reference job gave 611, 588 and 587 steps/s together on the H200).
Several per GPU still pay: while one evaluates, checkpoints, compiles or starts up, the others train.

The launcher (`hydra_plugins.gdn_exp_launcher`) hands the jobs over as `Job`s; `run_jobs` starts the workers,
feeds them jobs, and returns every job's results. A worker that dies (a segfault, a CUDA error that poisons its
context) fails only the job it was running; a new worker takes its place. SIGINT, SIGTERM or SIGUSR2 make the
running jobs checkpoint and stop, and no new job start: re-running the sweep skips what completed, and
trainer.resume=true continues the stopped ones.
"""
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One job of a sweep: its number, config (the task function's, without the hydra node, as YAML: the task
    schemas are made at run time and do not pickle), run directory, override string and wandb group; records:
    the run directory's Hydra files from before the launcher set the job up (`gdn_exp.rundir.hydra_records`)."""

    index: int
    config_yaml: str
    run_dir: str
    name: str
    group: str
    records: dict = field(default_factory=dict)

    def resolved(self) -> dict:
        """The job's config as a plain dict, interpolations resolved."""
        from omegaconf import OmegaConf

        from gdn_exp.config import register_configs

        register_configs()  # the resolvers its interpolations use
        return OmegaConf.to_container(OmegaConf.create(self.config_yaml), resolve=True, enum_to_str=True)


def plan_workers(num_gpus: int, jobs_per_gpu: int, n_jobs: int) -> list:
    """The device of each worker process: jobs_per_gpu per GPU, or without a GPU n_jobs on the CPU."""
    if jobs_per_gpu < 1 or n_jobs < 1:
        raise ValueError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu} and n_jobs={n_jobs} must be >= 1")
    if num_gpus > 0:
        return [f"cuda:{i}" for i in range(num_gpus) for _ in range(jobs_per_gpu)]
    return ["cpu"] * n_jobs


class _JobName(logging.Filter):
    """Puts the worker's current job into its console lines, and keeps the jobs' step lines (which their log files
    have) off the console."""

    current = "-"

    def filter(self, record):
        record.job = _JobName.current
        return record.name != "gdn_exp.progress"  # step lines and outcome: the job's log file has them


def job_config(job: Job, device: str, processes: int = 1):
    """The job's config as its worker runs it: on the worker's device (unless the job names one), without a
    progress bar (the workers' would interleave), in the sweep's wandb group, with its share of the CPU threads
    (`processes`: the workers training at once, `train.threads`)."""
    from omegaconf import OmegaConf, open_dict

    from gdn_exp.config import register_configs
    from gdn_exp.train.threads import auto_threads

    register_configs()  # the resolvers the config's interpolations use
    cfg = OmegaConf.create(job.config_yaml)
    OmegaConf.set_struct(cfg, True)
    with open_dict(cfg):
        if cfg.trainer.device == "auto":
            cfg.trainer.device = device
        cfg.trainer.progress = False
        if cfg.trainer.get("num_threads") is None:
            cfg.trainer.num_threads = auto_threads(processes)
        if cfg.logger.name == "wandb" and cfg.logger.group is None:
            cfg.logger.group = job.group
    return cfg


def run_one(job: Job, device: str, processes: int = 1) -> dict:
    """Trains `job` on `device` in this process; its log records, step lines included, go to <run dir>/cli.log (the
    file Hydra made for the job's log, hydra.job.name being cli), as a single run's do. Returns the
    results dict (results.json)."""
    from gdn_exp.rundir import RunDirInUse, claim, release, restore_records
    from gdn_exp.train import run_job

    cfg = job_config(job, device, processes)
    try:
        claim(Path(job.run_dir))
    except RunDirInUse as e:  # another process's job: its directory stays as that process leaves it
        return {"status": "failed", "user_error": True, "error": str(e)}
    handler = logging.FileHandler(Path(job.run_dir) / "cli.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    _JobName.current = f"{job.index}:{job.name}"
    try:
        results = run_job(cfg, Path(job.run_dir), skip_completed=cfg.trainer.skip_completed)
        if results.get("skipped") or results.get("refused"):  # Hydra's files as they were: nothing ran
            restore_records(Path(job.run_dir), job.records)
        logging.getLogger("gdn_exp.progress").info(describe(results))  # the launcher's console has it already
        return results
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        release(Path(job.run_dir))


def run_unit(unit, device: str, processes: int) -> dict:
    """{job index: results dict} of a Job, or of each job of a `sweep_pack.PackJob`, trained in this process."""
    from gdn_exp.sweep_pack import PackJob, run_pack_job

    if isinstance(unit, PackJob):
        return run_pack_job(unit, device, processes)
    return {unit.index: run_one(unit, device, processes)}


def _worker(device: str, conn, processes: int) -> None:
    """A worker process: runs the jobs (or packs) its launcher sends over `conn` and sends back each one's
    {job index: results}, until it gets None or a stop signal came."""
    from gdn_exp.train.loop import StopRequest, request_stop

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(job)s] %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_JobName())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):  # between jobs; a job installs its own
        signal.signal(sig, lambda signum, frame: request_stop(signal.Signals(signum).name))
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
    while StopRequest.signal is None:
        try:
            job = conn.recv()
        except (EOFError, ConnectionResetError):  # the launcher is gone
            return
        if job is None:
            return
        try:
            results = run_unit(job, device, processes)
        except Exception as e:  # run_job records failures itself; this is a bug in the runner
            failed = {"status": "failed", "error": f"{type(e).__name__}: {e}", "user_error": False,
                      "traceback": traceback.format_exc()}
            results = {j.index: failed for j in getattr(job, "jobs", [job])}
        try:
            conn.send(results)
        except (BrokenPipeError, ConnectionResetError):  # the launcher is gone: its job is stopped and recorded
            return
        if any(r.get("status") == "failed" and not r.get("user_error") for r in results.values()) \
                and not _device_healthy(device):
            os._exit(3)  # the CUDA context is lost: the launcher starts another worker


def _stop_when_orphaned(launcher: int) -> None:
    """Stops this worker's job (a checkpoint, then exit) once its launcher is gone (a kill -9)."""
    from gdn_exp.train.loop import request_stop

    while os.getppid() == launcher:
        time.sleep(1)
    request_stop("the launcher's exit")


def _device_healthy(device: str) -> bool:
    if not device.startswith("cuda"):
        return True
    import torch

    try:
        torch.cuda.synchronize(device)
        return True
    except RuntimeError:
        return False


def run_jobs(jobs: list, workers: list) -> dict:
    """Runs `jobs` (Jobs, or `sweep_pack.PackJob`s: several jobs as one pack) on `workers` (a device per worker
    process, see `plan_workers`); returns {job index: results}.

    Each worker has its own pipe to the launcher, which hands it one job at a time: a worker that dies (even
    while writing) blocks no other, and its pipe's end tells which job it took down. Jobs that never started
    (the sweep was stopped) are left out of the returned dict."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    pending = list(reversed(jobs))
    results = {}
    running = {}  # launcher's end of a worker's pipe -> (process, device, its job or None)
    stopping = None

    def hand_next(conn):
        process, device, _ = running[conn]
        job = pending.pop() if pending and stopping is None else None
        try:
            conn.send(job)
        except (BrokenPipeError, ConnectionResetError):  # it is gone: its end of file comes next
            pass
        running[conn] = (process, device, job)

    def start(device):
        conn, worker_end = context.Pipe()
        process = context.Process(target=_worker, args=(device, worker_end, len(workers)), daemon=True)
        process.start()
        worker_end.close()  # the worker's copy is then the only one: its death closes the pipe
        running[conn] = (process, device, None)
        hand_next(conn)

    def forward(signum, frame):  # a terminal's Ctrl-C reaches the workers itself; `kill`/`timeout` does not
        nonlocal stopping
        stopping = signal.Signals(signum).name
        for process, _, _ in running.values():
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
    try:
        for device in workers:
            start(device)
        while running:
            for conn in multiprocessing.connection.wait(list(running)):
                process, device, job = running[conn]
                try:
                    payload = conn.recv()
                except (EOFError, ConnectionResetError):  # the worker exited: done, stopped, or died (a reset
                    # instead of EOF when it left unread the job we handed it)
                    running.pop(conn)
                    conn.close()
                    process.join()
                    if process.exitcode != 0:  # a worker leaves cleanly only between jobs: then `job` never began
                        for lost in getattr(job, "jobs", [job] if job is not None else []):  # a pack: each job
                            results[lost.index] = _lost_job(lost, process.exitcode)
                        log.error("worker on %s died (exit code %s); failed: %s", device, process.exitcode,
                                  job.name if job else "no job")
                        if pending and stopping is None:
                            start(device)
                    continue
                results.update(payload)
                for index, job_results in payload.items():
                    log.info("job %d %s: %s", index, job.name, describe(job_results))
                hand_next(conn)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return results


def _lost_job(job: Job, exitcode) -> dict:
    from gdn_exp.train import write_results

    return write_results(Path(job.run_dir), {"status": "failed", "user_error": False,
                                             "error": f"the worker process died (exit code {exitcode})"})


def describe(results: dict) -> str:
    """One line for a job's results."""
    if results.get("skipped"):
        return "skipped (completed before)"
    if results.get("reused_from"):
        return f"reused: completed before in {results['reused_from']}"
    if results.get("status") == "completed":
        return (f"completed, test/accuracy {results.get('test/accuracy', float('nan')):.4f} at step "
                f"{results.get('steps', 0)} ({results.get('wall_time_s', 0):.0f} s)")
    return f"{results.get('status')}: {results.get('error', '')}"


def summary(jobs: list, results: dict) -> tuple:
    """(text, exit code) of a finished or stopped sweep: counts by outcome, and the directories of the jobs that
    did not complete; exit code 1 if any failed or diverged, 130 if some were stopped or never started, else 0."""
    groups = {"completed": [], "skipped": [], "reused": [], "failed": [], "stopped": [], "diverged": [],
              "not started": []}
    for job in jobs:
        r = results.get(job.index)
        key = ("not started" if r is None else "skipped" if r.get("skipped") else "reused" if r.get("reused_from")
               else r.get("status", "failed"))
        groups.setdefault(key, []).append(job)
    lines = ["sweep: " + ", ".join(f"{len(v)} {k}" for k, v in groups.items() if v)]
    for key in ("failed", "stopped", "diverged", "not started"):
        for job in groups[key]:
            error = (results.get(job.index) or {}).get("error", "")
            lines.append(f"  {key}: {job.run_dir}" + (f"  ({error})" if error else ""))
    if groups["reused"]:
        lines.append(f"  reused: {len(groups['reused'])} jobs link to a run under outputs/ that completed with the "
                     "same config; trainer.skip_completed=false trains them anew")
    if groups["failed"] or groups["stopped"] or groups["not started"]:
        lines.append("  re-run the same command to continue: completed jobs are skipped; add trainer.resume=true "
                     "to continue stopped ones from their checkpoints")
    code = 1 if groups["failed"] or groups["diverged"] else 130 if groups["stopped"] or groups["not started"] else 0
    return "\n".join(lines), code


# A completed run stands for a job that differs from it only in keys a resumed run may change
# (`train.checkpoint.RESUMABLE_CHANGES`), less these, which change where or how a completed run ended.
CHANGE_THE_END = {"trainer.max_steps", "trainer.target_accuracy", "trainer.eval_interval", "task.num_test"}


def computation_key(config: dict, device_type: str) -> str:
    """What a job computes, as one string: its resolved config without RESUMABLE_CHANGES (less CHANGE_THE_END), with
    trainer.precision as trained on `device_type` (cpu, cuda) when it is auto."""
    from gdn_exp.config import precision_used
    from gdn_exp.train.checkpoint import RESUMABLE_CHANGES, computed_by

    flat = computed_by(config, RESUMABLE_CHANGES - CHANGE_THE_END)
    flat["trainer.precision"] = precision_used(flat.get("trainer.precision", "auto"), device_type)
    return json.dumps(flat, sort_keys=True, default=str)


def completed_runs(roots: list) -> dict:
    """{computation_key: run dir} of the completed runs under `roots` (run dirs one or two levels down: runs/<run>,
    multiruns/<sweep>/<job>), the newest for each key. A job that reused another run points to that run."""
    import yaml

    found = {}
    paths = [p for root in roots if Path(root).is_dir() for depth in ("*", "*/*")
             for p in Path(root).glob(f"{depth}/results.json")]
    for path in sorted(set(paths), key=lambda p: p.stat().st_mtime):
        try:
            results = json.loads(path.read_text())
            config = yaml.safe_load((path.parent / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if results.get("status") != "completed" or not isinstance(config, dict):
            continue
        device = str(config.get("trainer", {}).get("device", ""))
        device_type = "cpu" if device == "cpu" or results.get("device") == "cpu" else "cuda"
        found[computation_key(config, device_type)] = Path(results.get("reused_from") or path.parent).resolve()
    return found


def reusable_jobs(jobs: list, roots: list, device_type: str) -> dict:
    """{job index: the completed run dir under `roots` that computed the same} for the jobs whose directory holds
    no run yet (a stopped or failed one there is resumed or trained again, not mixed with another's files) and
    that do not force re-training (trainer.skip_completed=false)."""
    done = completed_runs(roots)
    reusable = {}
    for job in jobs:
        if (Path(job.run_dir) / "results.json").exists() or (Path(job.run_dir) / "checkpoints").exists():
            continue
        config = job.resolved()
        if not config["trainer"].get("skip_completed", True):
            continue
        job_device = str(config["trainer"].get("device", "auto"))
        source = done.get(computation_key(config, device_type if job_device == "auto" else job_device[:4]))
        if source is not None and source.resolve() != Path(job.run_dir).resolve():
            reusable[job.index] = source
    return reusable


def link_reused(job: Job, source: Path) -> dict:
    """Makes job's run dir stand for the completed run `source`: a relative symlink to each of its files and
    directories (checkpoints, metrics.jsonl, config.yaml, ...) beside the job's own .hydra/ and cli.log (which
    says so), and its results.json with `reused_from`. Returns those results."""
    from gdn_exp.train import write_results

    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        target = run_dir / entry.name
        if entry.name in (".hydra", ".lock", "results.json") or target.exists() or target.is_symlink():
            continue
        target.symlink_to(os.path.relpath(entry.resolve(), run_dir.resolve()))
    with (run_dir / "cli.log").open("a") as log_file:  # Hydra's, empty: the source's log stays there
        log_file.write(f"reused: completed before in {source.resolve()} (its log: cli.log there)\n")
    results = json.loads((source / "results.json").read_text())
    return write_results(run_dir, {**results, "reused_from": str(source.resolve())})


def dry_run_text(jobs: list, reusable: dict) -> str:
    """What a sweep would do with each job, one line each (train, skip: completed in its own directory, reuse: a
    run that completed with its config), and the counts: the output of hydra.launcher.dry_run=true."""
    from gdn_exp.train.checkpoint import read_results

    lines, counts = [], {"train": 0, "skip": 0, "reuse": 0}
    for job in jobs:
        done = read_results(Path(job.run_dir)).get("status") == "completed"
        if done and job_config(job, "cpu").trainer.skip_completed:
            action, note = "skip", "  (completed)"
        elif job.index in reusable:
            action, note = "reuse", f"  <- {reusable[job.index]}"
        else:
            action, note = "train", ""
        counts[action] += 1
        lines.append(f"  {action:<5} {job.run_dir}{note}")
    head = f"dry run, nothing trained: {len(jobs)} jobs, " + ", ".join(f"{n} to {k}" for k, n in counts.items())
    return "\n".join([head, *lines])
