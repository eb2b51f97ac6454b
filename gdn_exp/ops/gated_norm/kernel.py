"""The GDN layer's output norm and the model's residual-stream norms, fused in Triton (forward and backward):

    y = RMSNorm(o) * weight * silu(gate)        per row of D = V values (silu(gate) only with a gate)
    s = x + delta;  y = RMSNorm(s) * weight     per row of D = d_model (`triton_add_rms_norm`: o = s, no gate)

Eager PyTorch runs the gated norm as three kernels forward and more backward, over [B, T, H, V] tensors in HBM
each time: ~6 ms of a training step at B8 T4096 d1024 (8 layers) on the H100, more than any single kernel of the
op (docs/perf.md). Here the forward reads o and gate once and writes y; backward recomputes the norm and
silu from o and gate (nothing else is saved) and writes do, dgate and per-program sums of the weight's gradient
(reduced in PyTorch). The PyTorch forms (the references, and the paths on CPU) are in `reference.py`.

Without a gate it is also the norm of the model's residual stream under autocast (`model.AutocastRMSNorm`, rows
of d_model), with the residual add before it fused in (`triton_add_rms_norm`): the forward reads the float32
residual x and the block's bf16 output delta and writes s = x + delta (float32, the new residual and the only
tensor saved) and y (bf16); backward reads s, dy and ds (the gradient reaching s from later layers; None after the
final norm) and writes g = ds + the norm's input gradient twice, as dx (float32) and ddelta (bf16). Eagerly the
add, backward's sum of the two gradients and the casts of float32 gradients to bf16 are separate elementwise
kernels: ~6.4 ms of a step at the shape above (H100 profile: adds ~140 us, gradient sums ~130 us, casts ~66 us
each, 4 casts per layer). Fused, the model's step went 85.4 -> 82.3 ms (predicted -4.5; docs/perf.md).
Its PyTorch form is `reference.add_rms_norm`.
"""
import torch
import triton
import triton.language as tl

from gdn_exp.ops.vmap import fold_models

# rows per program = ROW_ELEMENTS / D (D padded to a power of 2). The fastest of 512-8192 x 1-8 warps at
# B8 T4096 H8 V128 bf16 on the H100: forward 73 us, forward + backward 225 us (8192 at 4 warps: 91 / 378,
# the backward spilling at 255 registers).
ROW_ELEMENTS = 4096
NUM_WARPS = 4


@triton.jit
def load_rows(x, r, N, D: tl.constexpr, BD: tl.constexpr):
    """Offsets [BR, BD] of rows r [BR] of x [., D], their mask (rows below N) and the rows (float32, 0 where
    masked)."""
    d = tl.arange(0, BD)
    offs = r.to(tl.int64)[:, None] * D + d[None, :]
    mask = (r < N)[:, None] & (d < D)[None, :]
    return offs, mask, tl.load(x + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def normed(b_o, w, eps, D: tl.constexpr, BD: tl.constexpr):
    """The normalised rows n = o / rms(o) [BR, BD] and 1 / rms(o) [BR] of b_o [BR, BD], the weight [BD]; float32."""
    d = tl.arange(0, BD)
    b_rstd = 1 / tl.sqrt(tl.sum(b_o * b_o, 1) / D + eps)
    b_w = tl.load(w + d, mask=d < D, other=0).to(tl.float32)
    return b_o * b_rstd[:, None], b_rstd, b_w


@triton.jit
def gated_norm_fwd_kernel(o, gate, delta, s, w, y, R, eps, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                          HAS_GATE: tl.constexpr, HAS_DELTA: tl.constexpr):
    """y [M R, D] = o / rms(o) * w[m] (* silu(gate)) for rows m R .. (m + 1) R - 1 (model m of a pack: program
    axis 1; M = 1 alone); with a delta, o + delta in place of o, stored as s [M R, D]."""
    m = tl.program_id(1)
    r = m * R + tl.program_id(0) * BR + tl.arange(0, BR)
    offs, mask, b_o = load_rows(o, r, (m + 1) * R, D, BD)
    w += m * D
    if HAS_DELTA:
        # normalise s as stored (rounded to s's dtype), the values backward reads
        b_s = (b_o + tl.load(delta + offs, mask=mask, other=0).to(tl.float32)).to(s.dtype.element_ty)
        tl.store(s + offs, b_s, mask=mask)
        b_o = b_s.to(tl.float32)
    b_n, _, b_w = normed(b_o, w, eps, D, BD)
    b_y = b_n * b_w[None, :]
    if HAS_GATE:
        b_g = tl.load(gate + offs, mask=mask, other=0).to(tl.float32)
        b_y = b_y * b_g * tl.sigmoid(b_g)
    tl.store(y + offs, b_y.to(y.dtype.element_ty), mask=mask)


@triton.jit
def gated_norm_bwd_kernel(o, gate, w, dy, ds, do, dgate, ddelta, dw_part, R, eps, D: tl.constexpr,
                          BR: tl.constexpr, BD: tl.constexpr, HAS_GATE: tl.constexpr, HAS_DS: tl.constexpr,
                          HAS_DELTA: tl.constexpr):
    """do (+ ds where given; also stored as ddelta with a delta), dgate [M R, D] and dw_part[m, program, :] = this
    program's rows' sum of dy * silu(gate) * n. o is the norm's input (s with a delta). Rows and weights of model
    m as in the forward."""
    m, i = tl.program_id(1), tl.program_id(0)
    r = m * R + i * BR + tl.arange(0, BR)
    offs, mask, b_o = load_rows(o, r, (m + 1) * R, D, BD)
    w += m * D
    dw_part += (m * tl.num_programs(0) + i) * D
    b_n, b_rstd, b_w = normed(b_o, w, eps, D, BD)
    b_dy = tl.load(dy + offs, mask=mask, other=0).to(tl.float32)  # gradient w.r.t. y
    if HAS_GATE:
        b_g = tl.load(gate + offs, mask=mask, other=0).to(tl.float32)
        b_sig = tl.sigmoid(b_g)
        b_dgate = b_dy * b_n * b_w[None, :] * b_sig * (1 + b_g * (1 - b_sig))
        tl.store(dgate + offs, b_dgate.to(dgate.dtype.element_ty), mask=mask)
        b_dy = b_dy * b_g * b_sig  # now the gradient w.r.t. n * w
    d = tl.arange(0, BD)
    tl.store(dw_part + d, tl.sum(b_dy * b_n, 0), mask=d < D)
    b_dn = b_dy * b_w[None, :]
    # n = o * rstd: do = rstd * (dn - n * mean(dn * n)) per row
    b_do = b_rstd[:, None] * (b_dn - b_n * (tl.sum(b_dn * b_n, 1) / D)[:, None])
    if HAS_DS:  # s also feeds later layers: its gradient from there joins the norm's
        b_do += tl.load(ds + offs, mask=mask, other=0).to(tl.float32)
    tl.store(do + offs, b_do.to(do.dtype.element_ty), mask=mask)
    if HAS_DELTA:  # s = x + delta: delta's gradient is x's, in delta's dtype
        tl.store(ddelta + offs, b_do.to(ddelta.dtype.element_ty), mask=mask)


def launch(D: int) -> tuple:
    """(grid function of (rows per model R, models M), rows per program, padded D)."""
    BD = triton.next_power_of_2(D)
    BR = max(1, ROW_ELEMENTS // BD)
    return (lambda R, M: (triton.cdiv(R, BR), M)), BR, BD


class GatedRMSNormFunction(torch.autograd.Function):
    """weight [D], or [M, D] for a pack of M models whose rows come model after model (M R rows, o [M B, ..., D]):
    rows m R .. (m + 1) R - 1 take weight[m]."""

    @staticmethod
    def forward(o, weight, gate, delta, eps, out_dtype):
        """(y, s): s = o + delta, the norm's input, or None without a delta."""
        D = o.shape[-1]
        o = o.contiguous()
        gate = None if gate is None else gate.contiguous()
        delta = None if delta is None else delta.contiguous()
        grid, BR, BD = launch(D)
        M = 1 if weight.dim() == 1 else weight.shape[0]
        R = o.numel() // D // M
        y = torch.empty_like(o, dtype=out_dtype)
        s = None if delta is None else torch.empty_like(o, dtype=torch.promote_types(o.dtype, delta.dtype))
        gated_norm_fwd_kernel[grid(R, M)](o, gate, delta, s, weight.contiguous(), y, R, eps, D=D, BR=BR, BD=BD,
                                          HAS_GATE=gate is not None, HAS_DELTA=delta is not None, num_warps=NUM_WARPS)
        return y, s

    @staticmethod
    def setup_context(ctx, inputs, output):
        o, weight, gate, delta, eps, _ = inputs
        ctx.save_for_backward(o if output[1] is None else output[1], weight, gate)
        ctx.eps, ctx.o_dtype, ctx.delta_dtype = eps, o.dtype, None if delta is None else delta.dtype
        ctx.set_materialize_grads(False)  # ds stays None when s is not used later (the final norm): nothing to add

    @staticmethod
    def vmap(info, in_dims, o, weight, gate, delta, eps, out_dtype):
        """A pack's models in one launch: their rows one after another, each model's weight a row of [M, D]."""
        return fold_models(GatedRMSNormFunction.apply, info, in_dims, (o, weight, gate, delta, eps, out_dtype),
                           per_sequence=(0, 2, 3), per_model=(1,), num_outputs=2)

    @staticmethod
    def backward(ctx, dy, ds):
        norm_input, weight, gate = (None if x is None else x.contiguous() for x in ctx.saved_tensors)
        D = norm_input.shape[-1]
        grid, BR, BD = launch(D)
        M = 1 if weight.dim() == 1 else weight.shape[0]
        R = norm_input.numel() // D // M
        if dy is None:  # only s is used later
            dy = torch.zeros_like(norm_input)
        do = torch.empty_like(norm_input, dtype=ctx.o_dtype)
        dgate = None if gate is None else torch.empty_like(gate)
        ddelta = None if ctx.delta_dtype is None else torch.empty_like(norm_input, dtype=ctx.delta_dtype)
        dw_part = torch.empty(M, grid(R, M)[0], D, device=norm_input.device, dtype=torch.float32)
        gated_norm_bwd_kernel[grid(R, M)](norm_input, gate, weight, dy.contiguous(),
                                          None if ds is None else ds.contiguous(), do, dgate, ddelta, dw_part, R,
                                          ctx.eps, D=D, BR=BR, BD=BD, HAS_GATE=gate is not None,
                                          HAS_DS=ds is not None, HAS_DELTA=ddelta is not None, num_warps=NUM_WARPS)
        return do, dw_part.sum(-2).reshape(weight.shape).to(weight.dtype), dgate, ddelta, None, None


def check_shapes(x, weight, other, other_name: str) -> None:
    """weight [D] for x [..., D]; other (gate or delta) x's shape, or None."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [{x.shape[-1]}] for input {tuple(x.shape)}")
    if other is not None and other.shape != x.shape:
        raise ValueError(f"{other_name} {tuple(other.shape)} must have the input's shape {tuple(x.shape)}")


def triton_gated_rms_norm(o, weight, gate=None, eps: float = 1e-6, out_dtype=None):
    """RMSNorm over the last dim with a weight, times silu(gate) if given; differentiable in all three.

    Args:
        o: [..., D]; weight: [D]; gate: o's shape, or None.
        out_dtype: y's dtype, default o's (the model's block norms: float32 residual in, bf16 out).
    Returns:
        y: o's shape.
    """
    check_shapes(o, weight, gate, "gate")
    return GatedRMSNormFunction.apply(o, weight, gate, None, eps, out_dtype or o.dtype)[0]


def triton_add_rms_norm(x, delta, weight, eps: float = 1e-6, out_dtype=None):
    """The residual add and the RMSNorm after it: s = x + delta, y = RMSNorm(s) * weight over the last dim;
    differentiable in x, delta and weight (x and delta get the same gradient, each in its own dtype).

    Args:
        x: [..., D], the residual stream (float32 in the model); delta: x's shape, what a block adds to it (bf16
            under autocast); weight: [D].
        out_dtype: y's dtype, default s's.
    Returns:
        y: x's shape, out_dtype; s: x's shape in x's and delta's promoted dtype (as x + delta), the new residual.
    """
    check_shapes(x, weight, delta, "delta")
    s_dtype = torch.promote_types(x.dtype, delta.dtype)
    return GatedRMSNormFunction.apply(x, weight, None, delta, eps, out_dtype or s_dtype)
