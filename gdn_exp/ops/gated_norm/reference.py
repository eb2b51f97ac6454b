"""The norms' PyTorch forms: the references of `kernel.py` and the paths on CPU and in float32."""
import torch.nn.functional as F


def gated_rms_norm(o, weight, gate, eps: float):
    """RMSNorm(o) * weight over the last dim, times silu(gate) if gate is not None. o, gate: [..., V]; weight: [V].
    Returns o's shape and dtype."""
    # the weight in o's dtype: torch's fused RMSNorm kernel needs matching dtypes (bf16 o under autocast)
    o = F.rms_norm(o, o.shape[-1:], weight.to(o.dtype), eps)
    return o if gate is None else o * F.silu(gate)


def add_rms_norm(residual, delta, weight, eps: float, out_dtype=None):
    """(y, s): s = residual + delta (residual itself without delta), y = RMSNorm(s) * weight, cast to out_dtype."""
    if delta is not None:
        residual = residual + delta
    y = F.rms_norm(residual, residual.shape[-1:], weight, eps)
    return (y if out_dtype is None else y.to(out_dtype)), residual
