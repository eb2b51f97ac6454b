"""Total steps/s of k reference jobs in k processes on one GPU, as the local launcher runs a sweep (one job per
process). Run it with and without the CUDA MPS daemon (`nvidia-cuda-mps-control -d`) to see whether the GPU
overlaps the processes' kernels or time-slices their contexts.

    python scripts/probe_processes.py [mixer] [k ...]
"""
import sys
import time

import torch
import torch.multiprocessing as mp

from gdn_exp.dev.throughput import Job, reference_split

SECONDS = 4.0


def worker(mixer: str, seed: int, ready, start, steps) -> None:
    job = Job(mixer, reference_split(torch.device("cuda")), seed=seed)
    job.run(60)  # compile, capture, a window of replays
    torch.cuda.synchronize()
    ready.wait()
    begin = start.get()  # one start time for all: a job that began early would count extra steps
    while time.time() < begin:
        pass
    n = 0
    while time.time() < begin + SECONDS:
        job.run(10)
        n += 10
    torch.cuda.synchronize()
    steps.put((n, time.time() - begin))


def steps_per_s(mixer: str, k: int) -> float:
    ctx = mp.get_context("spawn")
    ready, start, steps = ctx.Barrier(k + 1), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(mixer, i, ready, start, steps)) for i in range(k)]
    for p in procs:
        p.start()
    ready.wait()
    begin = time.time() + 0.5
    for _ in procs:
        start.put(begin)
    results = [steps.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(n for n, _ in results) / max(seconds for _, seconds in results)


if __name__ == "__main__":
    mixer = sys.argv[1] if len(sys.argv) > 1 else "gdn"
    for k in map(int, sys.argv[2:] or ["1", "4", "8"]):
        print(f"{mixer}: {k} processes, {steps_per_s(mixer, k):.0f} steps/s in total", flush=True)
