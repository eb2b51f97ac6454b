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
import logging
import multiprocessing
import os
import queue
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One job of a sweep: its number, config (the task function's, without the hydra node, as YAML: the task
    schemas are made at run time and do not pickle), run directory, override string and wandb group."""

    index: int
    config_yaml: str
    run_dir: str
    name: str
    group: str


def plan_workers(num_gpus: int, jobs_per_gpu: int, n_jobs: int) -> list:
    """The device of each worker process: jobs_per_gpu per GPU, or without a GPU n_jobs on the CPU."""
    if jobs_per_gpu < 1 or n_jobs < 1:
        raise ValueError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu} and n_jobs={n_jobs} must be >= 1")
    if num_gpus > 0:
        return [f"cuda:{i}" for i in range(num_gpus) for _ in range(jobs_per_gpu)]
    return ["cpu"] * n_jobs


class _JobName(logging.Filter):
    """Puts the worker's current job into its console lines."""

    current = "-"

    def filter(self, record):
        record.job = _JobName.current
        return True


def job_config(job: Job, device: str):
    """The job's config as its worker runs it: on the worker's device (unless the job names one), without a
    progress bar (the workers' would interleave), in the sweep's wandb group."""
    from omegaconf import OmegaConf, open_dict

    from gdn_exp.config import register_configs

    register_configs()  # the resolvers the config's interpolations use
    cfg = OmegaConf.create(job.config_yaml)
    OmegaConf.set_struct(cfg, True)
    with open_dict(cfg):
        if cfg.trainer.device == "auto":
            cfg.trainer.device = device
        cfg.trainer.progress = False
        if cfg.logger.name == "wandb" and cfg.logger.group is None:
            cfg.logger.group = job.group
    return cfg


def run_one(job: Job, device: str) -> dict:
    """Trains `job` on `device` in this process; its log records go to <run dir>/train.log as well. Returns the
    results dict (results.json)."""
    from gdn_exp.rundir import RunDirInUse, claim, release
    from gdn_exp.train import run_job

    cfg = job_config(job, device)
    try:
        claim(Path(job.run_dir))
    except RunDirInUse as e:  # another process's job: its directory stays as that process leaves it
        return {"status": "failed", "user_error": True, "error": str(e)}
    handler = logging.FileHandler(Path(job.run_dir) / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    _JobName.current = f"{job.index}:{job.name}"
    try:
        return run_job(cfg, Path(job.run_dir), skip_completed=cfg.trainer.skip_completed)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        release(Path(job.run_dir))


def _worker(device: str, jobs, events) -> None:
    """A worker process: takes jobs from `jobs` until it yields None or a stop signal came."""
    from gdn_exp.train.loop import StopRequest, request_stop

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(job)s] %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_JobName())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):  # between jobs; a job installs its own
        signal.signal(sig, lambda signum, frame: request_stop(signal.Signals(signum).name))
    while StopRequest.signal is None:
        job = jobs.get()
        if job is None:
            return
        events.put(("start", job.index, os.getpid()))
        try:
            results = run_one(job, device)
        except Exception as e:  # run_job records failures itself; this is a bug in the runner
            results = {"status": "failed", "error": f"{type(e).__name__}: {e}", "user_error": False,
                       "traceback": traceback.format_exc()}
        events.put(("done", job.index, results))
        if results.get("status") == "failed" and not results.get("user_error") and not _device_healthy(device):
            os._exit(3)  # the CUDA context is lost: the launcher starts another worker


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
    """Runs `jobs` on `workers` (a device per worker process, see `plan_workers`); returns {job index: results}.

    Jobs that never started (the sweep was stopped) are left out of the returned dict."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    job_queue, events = context.Queue(), context.Queue()
    for job in jobs:
        job_queue.put(job)
    for _ in workers:
        job_queue.put(None)
    by_index = {job.index: job for job in jobs}
    results, running = {}, {}  # running: job index -> worker pid

    def start(device):
        process = context.Process(target=_worker, args=(device, job_queue, events), daemon=True)
        process.start()
        return process

    processes = {start(device): device for device in workers}
    stopping = None

    def forward(signum, frame):  # a terminal's Ctrl-C reaches the workers itself; `kill`/`timeout` does not
        nonlocal stopping
        stopping = signal.Signals(signum).name
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
    try:
        while any(process.is_alive() for process in processes) or not events.empty():
            try:
                kind, index, payload = events.get(timeout=1.0)
            except queue.Empty:
                for process in [p for p in processes if not p.is_alive() and p.exitcode not in (0, None)]:
                    device = processes.pop(process)
                    lost = [i for i, pid in running.items() if pid == process.pid]
                    for i in lost:
                        running.pop(i)
                        results[i] = _lost_job(by_index[i], process.exitcode)
                    log.error("worker on %s died (exit code %s); failed: %s", device, process.exitcode,
                              ", ".join(by_index[i].name for i in lost) or "no job")
                    if stopping is None:
                        processes[start(device)] = device
                continue
            if kind == "start":
                running[index] = payload
            else:
                running.pop(index, None)
                results[index] = payload
                log.info("job %d %s: %s", index, by_index[index].name, describe(payload))
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
    if results.get("status") == "completed":
        return (f"completed, test/accuracy {results.get('test/accuracy', float('nan')):.4f} at step "
                f"{results.get('steps', 0)} ({results.get('wall_time_s', 0):.0f} s)")
    return f"{results.get('status')}: {results.get('error', '')}"


def summary(jobs: list, results: dict) -> tuple:
    """(text, exit code) of a finished or stopped sweep: counts by outcome, and the directories of the jobs that
    did not complete; exit code 1 if any failed or diverged, 130 if some never started, else 0."""
    groups = {"completed": [], "skipped": [], "failed": [], "diverged": [], "not started": []}
    for job in jobs:
        r = results.get(job.index)
        key = "not started" if r is None else "skipped" if r.get("skipped") else r.get("status", "failed")
        groups.setdefault(key, []).append(job)
    lines = ["sweep: " + ", ".join(f"{len(v)} {k}" for k, v in groups.items() if v)]
    for key in ("failed", "diverged", "not started"):
        for job in groups[key]:
            error = (results.get(job.index) or {}).get("error", "")
            lines.append(f"  {key}: {job.run_dir}" + (f"  ({error})" if error else ""))
    if groups["failed"] or groups["not started"]:
        lines.append("  re-run the same command to continue: completed jobs are skipped; add trainer.resume=true "
                     "to continue stopped ones from their checkpoints")
    code = 1 if groups["failed"] or groups["diverged"] else 130 if groups["not started"] else 0
    return "\n".join(lines), code
