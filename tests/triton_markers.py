"""Shared by the Triton kernel tests. Import it before anything that imports triton: it turns the interpreter on
(TRITON_INTERPRET=1) unless the environment chose otherwise, so CPU runs test the kernels' logic and a CUDA
machine with TRITON_INTERPRET=0 runs them compiled."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU tests need TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                              reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)")
# The fused kernels' GPU tests against float64, by input dtype: bf16 rounds to 8 mantissa bits
GPU_TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def assert_close_to_reference(got: dict, ref: dict, tolerance: float) -> None:
    """Every tensor of got is finite (allocations NaN-poisoned: an element not written shows) and within
    ||got - ref|| / ||ref|| < tolerance of ref's (float64) tensor of the same name; None only where ref has None."""
    for name, b in ref.items():
        a = got[name]
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and torch.isfinite(a).all(), f"{name}: not finite (an element not written?)"
        ratio = ((a.double().cpu() - b).norm() / b.norm()).item()
        assert ratio < tolerance, f"{name}: ||got - ref|| / ||ref|| = {ratio:.2e} >= {tolerance:.0e}"
