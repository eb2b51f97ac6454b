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
import multiprocessing.connection
import os
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


def run_unit(unit, device: str) -> dict:
    """{job index: results dict} of a Job, or of each job of a `sweep_pack.PackJob`, trained in this process."""
    from gdn_exp.sweep_pack import PackJob, run_pack_job

    return run_pack_job(unit, device) if isinstance(unit, PackJob) else {unit.index: run_one(unit, device)}


def _worker(device: str, conn) -> None:
    """A worker process: runs the jobs (or packs) its launcher sends over `conn` and sends back each one's
    {job index: results}, until it gets None or a stop signal came."""
    from gdn_exp.train.loop import StopRequest, request_stop

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(job)s] %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_JobName())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):  # between jobs; a job installs its own
        signal.signal(sig, lambda signum, frame: request_stop(signal.Signals(signum).name))
    while StopRequest.signal is None:
        job = conn.recv()
        if job is None:
            return
        try:
            results = run_unit(job, device)
        except Exception as e:  # run_job records failures itself; this is a bug in the runner
            failed = {"status": "failed", "error": f"{type(e).__name__}: {e}", "user_error": False,
                      "traceback": traceback.format_exc()}
            results = {j.index: failed for j in getattr(job, "jobs", [job])}
        conn.send(results)
        if any(r.get("status") == "failed" and not r.get("user_error") for r in results.values()) \
                and not _device_healthy(device):
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
        process = context.Process(target=_worker, args=(device, worker_end), daemon=True)
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
