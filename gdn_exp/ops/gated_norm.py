"""The GDN layer's output norm, fused in Triton (forward and backward):

    y = RMSNorm(o) * weight * silu(gate)        per row of D = V values (silu(gate) only with a gate)

Eager PyTorch runs this as three kernels forward and more backward, over [B, T, H, V] tensors in HBM each time:
~6 ms of a training step at B8 T4096 d1024 (8 layers) on the H100, more than any single kernel of the op
(docs/perf.md, v6). Here the forward reads o and gate once and writes y; backward recomputes the norm and
silu from o and gate (nothing else is saved) and writes do, dgate and per-program sums of the weight's gradient
(reduced in PyTorch). The PyTorch form (the reference, and the path on CPU) is `gdn_exp.nn.gated_deltanet.
output_norm`. Without a gate and with a 16-bit out_dtype it is also the norm of the model's float32 residual
stream under autocast (`model.AutocastRMSNorm`, rows of d_model): float32 in, bf16 out, float32 gradient back.
"""
import torch
import triton
import triton.language as tl

# rows per program = ROW_ELEMENTS / D (D padded to a power of 2). The fastest of 512-8192 x 1-8 warps at
# B8 T4096 H8 V128 bf16 on the H100 (v6): forward 73 us, forward + backward 225 us (8192 at 4 warps: 91 / 378,
# the backward spilling at 255 registers).
ROW_ELEMENTS = 4096
NUM_WARPS = 4


@triton.jit
def normed_rows(o, w, r, N, eps, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Row offsets [BR, BD], mask, the normalised rows n = o / rms(o) and 1 / rms(o) [BR] (float32), weight [BD]."""
    d = tl.arange(0, BD)
    offs = r.to(tl.int64)[:, None] * D + d[None, :]
    mask = (r < N)[:, None] & (d < D)[None, :]
    b_o = tl.load(o + offs, mask=mask, other=0).to(tl.float32)
    b_rstd = 1 / tl.sqrt(tl.sum(b_o * b_o, 1) / D + eps)
    b_w = tl.load(w + d, mask=d < D, other=0).to(tl.float32)
    return offs, mask, b_o * b_rstd[:, None], b_rstd, b_w


@triton.jit
def gated_norm_fwd_kernel(o, gate, w, y, N, eps, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                          HAS_GATE: tl.constexpr):
    """y [N, D] = o / rms(o) * w (* silu(gate))."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    offs, mask, b_n, _, b_w = normed_rows(o, w, r, N, eps, D, BR, BD)
    b_y = b_n * b_w[None, :]
    if HAS_GATE:
        b_g = tl.load(gate + offs, mask=mask, other=0).to(tl.float32)
        b_y = b_y * b_g * tl.sigmoid(b_g)
    tl.store(y + offs, b_y.to(y.dtype.element_ty), mask=mask)


@triton.jit
def gated_norm_bwd_kernel(o, gate, w, dy, do, dgate, dw_part, N, eps, D: tl.constexpr, BR: tl.constexpr,
                          BD: tl.constexpr, HAS_GATE: tl.constexpr):
    """do, dgate [N, D] and dw_part[program, :] = this program's rows' sum of dy * silu(gate) * n."""
    i = tl.program_id(0)
    r = i * BR + tl.arange(0, BR)
    offs, mask, b_n, b_rstd, b_w = normed_rows(o, w, r, N, eps, D, BR, BD)
    b_dy = tl.load(dy + offs, mask=mask, other=0).to(tl.float32)  # gradient w.r.t. y
    if HAS_GATE:
        b_g = tl.load(gate + offs, mask=mask, other=0).to(tl.float32)
        b_sig = tl.sigmoid(b_g)
        b_dgate = b_dy * b_n * b_w[None, :] * b_sig * (1 + b_g * (1 - b_sig))
        tl.store(dgate + offs, b_dgate.to(dgate.dtype.element_ty), mask=mask)
        b_dy = b_dy * b_g * b_sig  # now the gradient w.r.t. n * w
    d = tl.arange(0, BD)
    tl.store(dw_part + i * D + d, tl.sum(b_dy * b_n, 0), mask=d < D)
    b_dn = b_dy * b_w[None, :]
    # n = o * rstd: do = rstd * (dn - n * mean(dn * n)) per row
    b_do = b_rstd[:, None] * (b_dn - b_n * (tl.sum(b_dn * b_n, 1) / D)[:, None])
    tl.store(do + offs, b_do.to(do.dtype.element_ty), mask=mask)


def launch(D: int) -> tuple:
    """(grid function of N, rows per program, padded D)."""
    BD = triton.next_power_of_2(D)
    BR = max(1, ROW_ELEMENTS // BD)
    return (lambda N: (triton.cdiv(N, BR),)), BR, BD


class GatedRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, weight, gate, eps, out_dtype):
        D = o.shape[-1]
        o = o.contiguous()
        gate = None if gate is None else gate.contiguous()
        grid, BR, BD = launch(D)
        N = o.numel() // D
        y = torch.empty_like(o, dtype=out_dtype)
        gated_norm_fwd_kernel[grid(N)](o, gate, weight, y, N, eps, D=D, BR=BR, BD=BD, HAS_GATE=gate is not None,
                                       num_warps=NUM_WARPS)
        ctx.save_for_backward(o, weight, gate)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        o, weight, gate = ctx.saved_tensors
        D = o.shape[-1]
        grid, BR, BD = launch(D)
        N = o.numel() // D
        do = torch.empty_like(o)
        dgate = None if gate is None else torch.empty_like(gate)
        dw_part = torch.empty(grid(N)[0], D, device=o.device, dtype=torch.float32)
        gated_norm_bwd_kernel[grid(N)](o, gate, weight, dy.contiguous(), do, dgate, dw_part, N, ctx.eps, D=D, BR=BR,
                                       BD=BD, HAS_GATE=gate is not None, num_warps=NUM_WARPS)
        return do, dw_part.sum(0).to(weight.dtype), dgate, None, None


def triton_gated_rms_norm(o, weight, gate=None, eps: float = 1e-6, out_dtype=None):
    """RMSNorm over the last dim with a weight, times silu(gate) if given; differentiable in all three.

    Args:
        o: [..., D]; weight: [D]; gate: o's shape, or None.
        out_dtype: y's dtype, default o's (the model's block norms: float32 residual in, bf16 out).
    Returns:
        y: o's shape.
    """
    if weight.shape != o.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [{o.shape[-1]}] for o {tuple(o.shape)}")
    if gate is not None and gate.shape != o.shape:
        raise ValueError(f"gate {tuple(gate.shape)} must have o's shape {tuple(o.shape)}")
    return GatedRMSNormFunction.apply(o, weight, gate, eps, out_dtype or o.dtype)
