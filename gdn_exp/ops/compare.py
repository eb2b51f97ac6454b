"""How every op is checked against its reference: per tensor, ||got - ref|| / ||ref|| under a tolerance, nothing
non-finite, and (with `nan_poisoned_allocations`) every output element written. Used by the ops' tests and by
the GPU correctness matrix (`gated_delta_rule/check.py`)."""
import contextlib

import torch

# The fused kernels' tolerance against float64 by input dtype: bf16 rounds to 8 mantissa bits.
GPU_TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def compare(got: dict, ref: dict, tolerance, label: str = "", verbose: bool = False) -> list:
    """The names of ref's tensors that got fails: None where ref has a tensor (or the reverse), another shape, a
    non-finite element, or ||got - ref|| / ||ref|| above `tolerance` (a number, or a dict by name; ||ref|| counts as
    at least got's dtype's smallest normal number in every element). Prints the max-abs error and the ratio of
    each tensor with verbose, and of each failure always."""
    failed = []
    for name, b in ref.items():
        a = got.get(name)
        if a is None or b is None:
            if (a is None) != (b is None):
                failed.append(name)
                print(f"  {label:52s} {name:12s} {'missing' if a is None else 'unexpected'} FAIL")
            continue
        limit = tolerance[name] if isinstance(tolerance, dict) else tolerance
        # got's dtype holds nothing below its smallest normal number to relative precision (float16's is 6e-5:
        # a dg of ~1e-12 under a strong decay flushes to 0), so errors count relative to at least that RMS
        floor = torch.finfo(a.dtype).smallest_normal * a.numel() ** 0.5 if a.is_floating_point() else 0.0
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        finite = a.shape == b.shape and bool(torch.isfinite(a).all())
        ratio = ((a - b).norm() / b.norm().clamp_min(max(floor, 1e-30))).item() if finite else float("nan")
        max_abs = (a - b).abs().max().item() if finite and a.numel() else 0.0
        ok = finite and ratio <= limit
        if not ok:
            failed.append(name)
        if verbose or not ok:
            shape = "" if a.shape == b.shape else f" shape {tuple(a.shape)} != {tuple(b.shape)}"
            print(f"  {label:52s} {name:12s} max_abs {max_abs:9.2e}  ratio {ratio:9.2e}  (<= {limit:.0e}){shape} "
                  f"{'ok' if ok else 'FAIL'}")
    return failed


def assert_close(got: dict, ref: dict, tolerance, label: str = "") -> None:
    """`compare` as a test assertion."""
    failed = compare(got, ref, tolerance, label)
    assert not failed, f"{label}: {', '.join(failed)} not within {tolerance} of the reference (printed above)"


@contextlib.contextmanager
def nan_poisoned_allocations():
    """Fills floating-point torch.empty / torch.empty_like allocations with NaN, so an element a kernel
    fails to write shows up as NaN in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
