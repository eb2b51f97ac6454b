"""Which implementation of an op runs: every op's public function takes `backend=` and asks `resolve_backend`.

    "auto"    Triton for CUDA tensors, PyTorch otherwise
    "triton"  Triton; also on CPU tensors under TRITON_INTERPRET=1 (float32 only), which is how CI tests kernels
    "torch"   the op's PyTorch reference
"""
import functools
import gc
import os

import torch

BACKENDS = ("auto", "triton", "torch")


class KernelUnavailableError(RuntimeError):
    """The requested backend cannot run here (e.g. Triton without CUDA)."""


def triton_available(device: torch.device) -> bool:
    """True when Triton kernels can run on tensors of `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Maps "auto" to "triton" or "torch" for `device`; raises KernelUnavailableError if Triton can't run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not triton_available(device):
        raise KernelUnavailableError(
            f"backend=triton needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); got device {device}")
    return backend


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs one program at a time)."""
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def compile_ahead(fn, workers: int = 16) -> int:
    """Compiles every Triton kernel that `fn()` launches, all at once, before they are first needed.

    Runs fn() with each Triton launch recorded instead of run (so what fn computes is garbage), then compiles the
    recorded launches in a thread pool: Triton's compiler releases the GIL, and one by one, at their first launch,
    the MQAR reference job's ~20 kernels take ~13 s to compile (2-core CPU; 6.6 s on two threads), most of a
    fresh machine's start-up. Each compiled kernel is also loaded (`_init_handles`): its launcher, a C stub that
    Triton builds with the host compiler at a kernel's first launch, took another ~0.25 s per kernel, one by one,
    in the first step. Returns the number of distinct launches. Call it with CUDA tensors; compiled kernels land in
    Triton's caches (memory and disk), where the real launches find them.
    """
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime.jit import JITFunction

    launches, run = {}, JITFunction.run

    def record(kernel, *args, grid, warmup, **kwargs):
        key = (kernel, tuple((a.dtype, a.dim()) if isinstance(a, torch.Tensor) else a for a in args),
               tuple(sorted(kwargs.items())))
        launches.setdefault(repr(key), (kernel, args, grid, kwargs))

    JITFunction.run = record
    try:
        fn()
    finally:
        JITFunction.run = run
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else -1

    def compile_and_load(launch):
        kernel, args, grid, kwargs = launch
        with torch.cuda.device(device):  # a new thread starts on device 0; -1 leaves it alone
            run(kernel, *args, grid=grid, warmup=True, **kwargs)._init_handles()

    with ThreadPoolExecutor(min(workers, os.cpu_count() or 1, max(len(launches), 1))) as pool:
        list(pool.map(compile_and_load, launches.values()))
    return len(launches)


def compiled_kernels() -> list:
    """The compiled kernels in every Triton function's in-memory cache (a launch not found there compiles)."""
    from triton.runtime.jit import JITFunction

    return [kernel for fn in gc.get_objects() if isinstance(fn, JITFunction)
            for cache in fn.device_caches.values() for kernel in cache[0].values()]
