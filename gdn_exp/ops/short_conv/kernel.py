"""The GDN layer's path from its qkv projection to the op's inputs, fused in Triton (forward and backward):

    y = causal depthwise conv of x (width W),   s = silu(y),   out = s / max(|s|, eps) per head (if normalised)

x [B, T, C] holds consecutive parts (q, k, v): `parts` lists each part's (heads, head_dim, normalise); each part
comes out as a contiguous [B, T, heads, head_dim] tensor. One program per (block of BT tokens, sequence, head):
the W taps are W loads of neighbouring rows. Backward saves nothing but x: one kernel recomputes y and s and writes
dy (the gradient w.r.t. y, in x's dtype) for NB blocks of rows and their sums of the weight's gradient (reduced in
PyTorch); a second one gathers dx[t] = sum_i w[W-1-i] dy[t + i]. (Recomputing dy for the W shifted rows inside
one kernel instead ran at 255 registers and took 1.1 ms per part at B8 T4096 d1024 on the H100.)

The PyTorch reference (and the path on CPU, with a conv cache, or without the conv) is `reference.py`. Eager, that chain was ~10 ms of each layer's training step at
B8 T4096 d1024 on the H100, several times the op itself (docs/perf.md).
"""
import torch
import triton
import triton.language as tl

from gdn_exp.ops.backend import sm_count
from gdn_exp.ops.vmap import fold_models, loop_models

NORM_EPS = 1e-12  # F.normalize's
# Tokens (and channels) per program, and warps; NB: row blocks per backward program (it adds up their weight-
# gradient sums). Swept at B8 T4096 d1024 bf16 on the H100: backward with dx 0.83 ms per layer at BT=32, NB=1,
# 4 warps; 0.61 at BT=16, 1 warp (the sums over the block's rows stay inside one warp); 0.55 with NB=8 (8x fewer
# partial sums to write and add). The forward and dx kernels are within 5 % of their best at 2-4 warps.
FWD_LAUNCH = dict(BT=32, num_warps=4)
BWD_LAUNCH = dict(BT=16, num_warps=1)
MAX_NB = 8
DX_LAUNCH = dict(BT=32, BC=128, num_warps=4)


def backward_blocks(B: int, T: int, heads: int, sms: int) -> int:
    """NB: up to MAX_NB row blocks per backward program, as long as the grid keeps at least 8 one-warp programs
    per SM. A short batch gets fewer blocks per program: at B64 T256 (the MQAR grid's reference job) NB = 8 gave
    128 programs, each walking its 8 blocks one after another (50 us per part on the H200, docs/perf.md)."""
    blocks = triton.cdiv(T, BWD_LAUNCH["BT"])
    NB = MAX_NB
    while NB > 1 and triton.cdiv(blocks, NB) * B * heads < 8 * sms:
        NB //= 2
    return NB


@triton.jit
def conv_silu_rows(x, w, b, t, T, position, col, o_d, m_d, C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                   BD: tl.constexpr, IS_VARLEN: tl.constexpr):
    """y and sigmoid(y) [BT, BD] (float32) at rows t of sequence b, channels col + o_d. A tap reads zero before
    the sequence start (IS_VARLEN: before the start of the token's packed sequence, from position)."""
    m_t = (t >= 0) & (t < T)
    if IS_VARLEN:
        pos = tl.load(position + t, mask=m_t, other=0)
    b_y = tl.zeros([BT, BD], dtype=tl.float32)
    for i in tl.static_range(W):  # tap i reads the input i steps back
        m_i = m_t & (t - i >= 0)
        if IS_VARLEN:
            m_i = m_i & (pos >= i)
        row = (b * T + t - i).to(tl.int64)
        b_x = tl.load(x + row[:, None] * C + col + o_d[None, :], mask=m_i[:, None] & m_d[None, :], other=0)
        b_w = tl.load(w + (col + o_d) * W + (W - 1 - i), mask=m_d, other=0)
        b_y += b_x.to(tl.float32) * b_w.to(tl.float32)[None, :]
    return b_y, tl.sigmoid(b_y)


@triton.jit
def conv_silu_fwd_kernel(x, w, position, out, T, col0, BM, C: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                         W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, NORM: tl.constexpr,
                         IS_VARLEN: tl.constexpr, EPS: tl.constexpr):
    """out [B, T, H, D] = silu(conv(x))[..., col0 + h D + d], divided by its norm over d if NORM. Sequence b
    takes the weight of model b // BM (w [M, C, W]: a pack's models, BM sequences each; alone M = 1, BM = B)."""
    i_t, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    w += (b // BM).to(tl.int64) * C * W
    t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_y, b_sig = conv_silu_rows(x, w, b, t, T, position, col0 + h * D, o_d, m_d, C, W, BT, BD, IS_VARLEN)
    b_s = b_y * b_sig
    if NORM:
        b_s = b_s / tl.maximum(tl.sqrt(tl.sum(b_s * b_s, 1)), EPS)[:, None]
    row = (b * T + t).to(tl.int64)
    tl.store(out + (row[:, None] * H + h) * D + o_d[None, :], b_s.to(out.dtype.element_ty),
             mask=(t < T)[:, None] & m_d[None, :])


@triton.jit
def conv_silu_grad_pre(x, w, dout, b, t, T, position, col, h, o_d, m_d, C: tl.constexpr, H: tl.constexpr,
                       D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, NORM: tl.constexpr,
                       IS_VARLEN: tl.constexpr, EPS: tl.constexpr):
    """Gradient w.r.t. the convolution's output y [BT, BD] at rows t (zero outside the sequence)."""
    b_y, b_sig = conv_silu_rows(x, w, b, t, T, position, col, o_d, m_d, C, W, BT, BD, IS_VARLEN)
    m_t = (t >= 0) & (t < T)
    row = (b * T + t).to(tl.int64)
    b_ds = tl.load(dout + (row[:, None] * H + h) * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                   other=0).to(tl.float32)
    if NORM:  # out = s / max(|s|, eps): ds = (dout - out <dout, out>) / |s|, or dout / eps below eps
        b_s = b_y * b_sig
        b_norm = tl.sqrt(tl.sum(b_s * b_s, 1))
        b_n = tl.maximum(b_norm, EPS)
        b_out = b_s / b_n[:, None]
        b_dot = tl.where(b_norm > EPS, tl.sum(b_ds * b_out, 1), 0.0)
        b_ds = (b_ds - b_out * b_dot[:, None]) / b_n[:, None]
    return b_ds * b_sig * (1 + b_y * (1 - b_sig))


@triton.jit
def conv_silu_bwd_kernel(x, w, position, dout, dy, dw_part, T, col0, BM, C: tl.constexpr, H: tl.constexpr,
                         D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                         NB: tl.constexpr, NORM: tl.constexpr, IS_VARLEN: tl.constexpr, EPS: tl.constexpr):
    """dy [B, T, C] (gradient w.r.t. the convolution's output) at this part's channels for NB blocks of BT
    rows, and dw_part[program, c, W-1-i] = sum over those rows t of x[t - i] dy[t]. Weights per model as in the
    forward."""
    i_t, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    w += (b // BM).to(tl.int64) * C * W
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    col = col0 + h * D
    o_w = tl.arange(0, WP)  # weight column W-1-i of tap i
    b_dw = tl.zeros([WP, BD], dtype=tl.float32)
    for j in range(NB):
        t = (i_t * NB + j) * BT + tl.arange(0, BT)
        m_t = t < T
        b_dy = conv_silu_grad_pre(x, w, dout, b, t, T, position, col, h, o_d, m_d, C, H, D, W, BT, BD, NORM,
                                  IS_VARLEN, EPS)
        row = (b * T + t).to(tl.int64)
        tl.store(dy + row[:, None] * C + col + o_d[None, :], b_dy.to(dy.dtype.element_ty),
                 mask=m_t[:, None] & m_d[None, :])
        if IS_VARLEN:
            pos = tl.load(position + t, mask=m_t, other=0)
        for i in tl.static_range(W):
            m_i = m_t & (t - i >= 0)
            if IS_VARLEN:
                m_i = m_i & (pos >= i)
            b_x = tl.load(x + (row - i)[:, None] * C + col + o_d[None, :], mask=m_i[:, None] & m_d[None, :],
                          other=0)
            b_dw += tl.where(o_w[:, None] == W - 1 - i, tl.sum(b_x.to(tl.float32) * b_dy, 0)[None, :], 0.0)
    o_block = (i_t * tl.num_programs(1) + b).to(tl.int64) * C * W
    tl.store(dw_part + o_block + (col + o_d)[None, :] * W + o_w[:, None], b_dw,
             mask=(o_w < W)[:, None] & m_d[None, :])


@triton.jit
def conv_dx_kernel(dy, w, position, dx, T, BM, C: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
                   BC: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dx[t] = sum_i w[W-1-i] dy[t + i] over the taps that stay in token t's sequence (all channels); weights per
    model as in the forward."""
    i_t, b, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    w += (b // BM).to(tl.int64) * C * W
    t = i_t * BT + tl.arange(0, BT)
    c = i_c * BC + tl.arange(0, BC)
    m_c = c < C
    b_dx = tl.zeros([BT, BC], dtype=tl.float32)
    for i in tl.static_range(W):
        m_i = t + i < T
        if IS_VARLEN:  # token t + i reaches back to t only if both are in one sequence
            m_i = m_i & (tl.load(position + t + i, mask=m_i, other=0) >= i)
        row = (b * T + t + i).to(tl.int64)
        b_dy = tl.load(dy + row[:, None] * C + c[None, :], mask=m_i[:, None] & m_c[None, :], other=0)
        b_w = tl.load(w + c * W + (W - 1 - i), mask=m_c, other=0)
        b_dx += b_dy.to(tl.float32) * b_w.to(tl.float32)[None, :]
    row = (b * T + t).to(tl.int64)
    tl.store(dx + row[:, None] * C + c[None, :], b_dx.to(dx.dtype.element_ty), mask=(t < T)[:, None] & m_c[None, :])


def part_launches(parts):
    """(first channel, heads, head_dim, normalise) of each part, consecutive along the channels."""
    col0, launches = 0, []
    for heads, dim, norm in parts:
        launches.append((col0, heads, dim, norm))
        col0 += heads * dim
    return launches


class ShortConvSiluFunction(torch.autograd.Function):
    """weight [C, W], or [M, C, W] for a pack of M models whose sequences come model after model (x [M B', T, C]):
    sequence b takes weight[b // B']."""

    @staticmethod
    def forward(x, weight, position, parts):
        x, weight = x.contiguous(), weight.contiguous()
        B, T, C = x.shape
        BM = B // models(weight)
        outs = []
        for col0, heads, dim, norm in part_launches(parts):
            out = torch.empty(B, T, heads, dim, device=x.device, dtype=x.dtype)
            conv_silu_fwd_kernel[(triton.cdiv(T, FWD_LAUNCH["BT"]), B, heads)](
                x, weight, position, out, T, col0, BM, C=C, H=heads, D=dim, W=weight.shape[-1],
                BD=triton.next_power_of_2(dim), NORM=norm, IS_VARLEN=position is not None, EPS=NORM_EPS,
                **FWD_LAUNCH)
            outs.append(out)
        return tuple(outs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, position, ctx.parts = inputs
        ctx.save_for_backward(x, weight, position)

    @staticmethod
    def vmap(info, in_dims, x, weight, position, parts):
        """A pack's models in one launch (each model's weight a row of [M, C, W]); packed sequences (position)
        one launch per model."""
        args = (x, weight, position, parts)
        if position is not None:
            return loop_models(ShortConvSiluFunction.apply, info, in_dims, args)
        return fold_models(ShortConvSiluFunction.apply, info, in_dims, args, per_sequence=(0,), per_model=(1,),
                           num_outputs=len(parts))

    @staticmethod
    def backward(ctx, *douts):
        x, weight, position = ctx.saved_tensors
        x, weight = x.contiguous(), weight.contiguous()
        B, T, C = x.shape
        W, M = weight.shape[-1], models(weight)
        NB = backward_blocks(B, T, min(heads for heads, _, _ in ctx.parts), sm_count(x.device))
        NT = triton.cdiv(T, BWD_LAUNCH["BT"] * NB)
        dy = torch.empty_like(x)
        dw_part = torch.empty(NT * B, C, W, device=x.device, dtype=torch.float32)
        for (col0, heads, dim, norm), dout in zip(part_launches(ctx.parts), douts):
            dout = torch.zeros(B, T, heads, dim, device=x.device, dtype=x.dtype) if dout is None else dout.contiguous()
            conv_silu_bwd_kernel[(NT, B, heads)](
                x, weight, position, dout, dy, dw_part, T, col0, B // M, C=C, H=heads, D=dim, W=W,
                WP=triton.next_power_of_2(W), BD=triton.next_power_of_2(dim), NB=NB, NORM=norm,
                IS_VARLEN=position is not None, EPS=NORM_EPS, **BWD_LAUNCH)
        dx = torch.empty_like(x)
        conv_dx_kernel[(triton.cdiv(T, DX_LAUNCH["BT"]), B, triton.cdiv(C, DX_LAUNCH["BC"]))](
            dy, weight, position, dx, T, B // M, C=C, W=W, IS_VARLEN=position is not None, **DX_LAUNCH)
        dw = dw_part.view(NT, M, B // M, C, W).sum((0, 2)).reshape(weight.shape)  # each model's own sum
        return dx, dw.to(weight.dtype), None, None


def models(weight) -> int:
    """M of a weight [M, C, W] (a pack's); 1 for [C, W]."""
    return 1 if weight.dim() == 2 else weight.shape[0]


def triton_short_conv_silu(x, weight, parts, position=None):
    """Fused causal depthwise conv, SiLU and per-head L2 norm, differentiable in x and weight.

    Args:
        x: [B, T, C]; weight: [C, W].
        parts: ((heads, head_dim, normalise), ...) splitting C in order (sum of heads * head_dim = C).
        position: int32 [T] tokens of its own packed sequence before each token (B = 1), or None.
    Returns:
        one [B, T, heads, head_dim] tensor per part, in x's dtype.
    """
    if position is not None:
        position = position.to(device=x.device, dtype=torch.int32).contiguous()
    return ShortConvSiluFunction.apply(x, weight, position, tuple(parts))
