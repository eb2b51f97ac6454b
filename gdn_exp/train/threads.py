"""How many CPU threads a job's torch ops use (trainer.num_threads).

torch's own default is one OpenMP thread per core. On a machine other processes share, that is the worst choice:
the threads of one op wait for each other at every barrier, and a thread the OS has lent to another process makes
all of them wait. On 2 cores with 2 busy processes beside it, 100 steps of `model=small task=copy` took 109 s with
2 threads and 16 s with 1 (2026-12-08); quiet, 1 thread was within 30% of 2. So `auto` takes half the cores this
process may run on (os.sched_getaffinity: a container's or taskset's limit, not the host's count), shared among
the processes that train at once (a sweep's workers, a torchrun job's ranks), at least 1 and at most 4.
"""
import os
from typing import Optional

MAX_AUTO_THREADS = 4  # a small model gains little past this, and a larger one trains on a GPU


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_threads(processes: int = 1) -> int:
    """`trainer.num_threads=null`: half the available cores shared among `processes`, in [1, MAX_AUTO_THREADS]."""
    return max(1, min(MAX_AUTO_THREADS, available_cores() // (2 * processes)))


def describe_threads(requested: Optional[int], used: int) -> str:
    """The start-up line's words for the thread count: `1 CPU thread (auto, 2 cores)`."""
    plural = "s" if used != 1 else ""
    return f"{used} CPU thread{plural}" + ("" if requested else f" (auto, {available_cores()} cores)")
