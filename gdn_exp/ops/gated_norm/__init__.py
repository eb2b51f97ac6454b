"""RMSNorm in two places, each one kernel each way on the Triton backend:

    y = RMSNorm(o) * weight * silu(gate)       the Gated DeltaNet layer's output norm (`gated_rms_norm`)
    s = x + delta;  y = RMSNorm(s) * weight    the model's residual add and the norm after it (`add_rms_norm`)

    kernel.py      the fused Triton forms, forward and backward
    reference.py   the PyTorch forms (their references; the paths on CPU)
"""
from gdn_exp.ops.backend import resolve_backend

from . import reference


def gated_rms_norm(o, weight, gate=None, *, eps: float, backend="auto"):
    """RMSNorm(o) * weight over the last dim, times silu(gate) if given; differentiable in all three.

    Args:
        o: [..., D]; weight: [D]; gate: o's shape, or None.
        backend: "auto", "triton" or "torch".
    Returns:
        y: o's shape and dtype.
    """
    if resolve_backend(backend, o.device) == "triton":
        from .kernel import triton_gated_rms_norm  # imports Triton, which is Linux-only

        return triton_gated_rms_norm(o, weight, gate, eps)
    return reference.gated_rms_norm(o, weight, gate, eps)


def add_rms_norm(residual, delta, weight, *, eps: float, out_dtype=None, backend="auto"):
    """The residual add and the RMSNorm after it: (y, s) with s = residual + delta (residual without a delta),
    y = RMSNorm(s) * weight in out_dtype (default s's dtype); differentiable in residual, delta and weight.

    Args:
        residual: [..., D] (float32 in the model); delta: residual's shape (bf16 under autocast) or None;
            weight: [D].
        out_dtype: y's dtype (the model's autocast dtype), or None.
        backend: "auto", "triton" or "torch". Triton runs where there is a cast to fuse (out_dtype given): the
            add, the norm, both casts and backward's gradient sum in one kernel each way.
    """
    if out_dtype is not None and resolve_backend(backend, residual.device) == "triton":
        from .kernel import triton_add_rms_norm, triton_gated_rms_norm  # imports Triton, which is Linux-only

        if delta is None:
            return triton_gated_rms_norm(residual, weight, None, eps, out_dtype=out_dtype), residual
        return triton_add_rms_norm(residual, delta, weight, eps, out_dtype=out_dtype)
    return reference.add_rms_norm(residual, delta, weight, eps, out_dtype)
