"""The language-model loss in Triton: cross-entropy over the vocabulary, forward and backward.

    loss = sum over scored rows of (logsumexp(x_row) - x_row[label]), divided by the scored count ("mean")
    dx   = (softmax(x_row) - onehot(label)) * scale * dloss            (0 on rows labelled ignore_index)

`F.cross_entropy(logits.float(), ...)` on [tokens, vocab] bf16 logits writes a float32 copy of the logits, a
float32 log-softmax that autograd keeps, a float32 gradient and its bf16 cast: ~15 ms of a training step at
32 K tokens x 32 K vocabulary on the H100 (docs/perf.md). Here the forward reads each row once in
its own dtype (online max and sum of exponentials) and keeps only logsumexp per row; backward reads the row
again and writes the gradient once in the logits' dtype, the math float32 throughout. The PyTorch form (the
reference, and the path on CPU) is F.cross_entropy on float32 logits (`reference.py`).
"""
import torch
import triton
import triton.language as tl

from gdn_exp.ops.vmap import loop_models

BLOCK_V = 4096  # vocabulary entries per step along a row
NUM_WARPS = 8


@triton.jit
def cross_entropy_fwd_kernel(x, labels, loss, lse, V, ignore_index, BLOCK: tl.constexpr):
    """Row `row` of x [N, V]: lse[row] = logsumexp(x_row) and loss[row] = lse - x_row[label] (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = float("-inf")  # running max of the row and sum of exp(x - m): one exponential per element
    s = 0.0
    for start in range(0, V, BLOCK):
        b_x = tl.load(x + row * V + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(b_x, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # only -inf so far: s stays 0, no NaN
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(b_x - shift), 0)
        m = m_new
    b_lse = m + tl.log(s)
    label = tl.load(labels + row)
    scored = label != ignore_index
    x_label = tl.load(x + row * V + tl.where(scored, label, 0)).to(tl.float32)
    tl.store(lse + row, b_lse)
    tl.store(loss + row, tl.where(scored, b_lse - x_label, 0.0))


@triton.jit
def cross_entropy_bwd_kernel(x, labels, lse, scale, dx, V, ignore_index, R, BLOCK: tl.constexpr):
    """dx_row = (exp(x_row - lse[row]) - onehot(label)) * scale[row // R] (0 if the row is ignored): the scale of
    the row's model (a pack's models own R rows each; alone R = N)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    label = tl.load(labels + row)
    b_scale = tl.where(label != ignore_index, tl.load(scale + row // R), 0.0)
    b_lse = tl.load(lse + row)
    for start in range(0, V, BLOCK):
        c = start + cols
        b_x = tl.load(x + row * V + c, mask=c < V, other=0).to(tl.float32)
        b_dx = (tl.exp(b_x - b_lse) - tl.where(c == label, 1.0, 0.0)) * b_scale
        tl.store(dx + row * V + c, b_dx.to(dx.dtype.element_ty), mask=c < V)


class CrossEntropyFunction(torch.autograd.Function):
    """models: M > 1 for a pack whose M models own N / M rows each, one after another ("sum" only): the loss is
    then each model's sum, [M]."""

    @staticmethod
    def forward(logits, labels, ignore_index, reduction, block_v, models):
        """(the loss, and what backward keeps: logsumexp per row [N], the number of scored rows or None)."""
        N, V = logits.shape
        block = min(block_v, triton.next_power_of_2(V))
        logits, labels = logits.contiguous(), labels.contiguous()
        loss = torch.empty(N, device=logits.device, dtype=torch.float32)
        lse = torch.empty(N, device=logits.device, dtype=torch.float32)
        cross_entropy_fwd_kernel[(N,)](logits, labels, loss, lse, V, ignore_index, BLOCK=block, num_warps=NUM_WARPS)
        total = loss.sum() if models == 1 else loss.view(models, -1).sum(1)
        num_scored = (labels != ignore_index).sum() if reduction == "mean" else None
        return total / num_scored if reduction == "mean" else total, lse, num_scored

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, ctx.ignore_index, _, block_v, ctx.models = inputs
        _, lse, num_scored = output
        ctx.save_for_backward(logits, labels, lse, num_scored)
        ctx.block = min(block_v, triton.next_power_of_2(logits.shape[1]))
        ctx.mark_non_differentiable(*(x for x in (lse, num_scored) if x is not None))

    @staticmethod
    def vmap(info, in_dims, logits, labels, ignore_index, reduction, block_v, models):
        """A pack's models in one launch each way, their rows one after another, each summed on its own; a mean
        (over each model's own scored rows) one launch per model."""
        args = (logits, labels, ignore_index, reduction, block_v, models)
        if reduction != "sum":
            return loop_models(CrossEntropyFunction.apply, info, in_dims, args)
        M = info.batch_size
        logits, labels = (x.movedim(d, 0).flatten(0, 1) if d is not None else x.expand(M, *x.shape).flatten(0, 1)
                          for x, d in ((logits, in_dims[0]), (labels, in_dims[1])))
        return CrossEntropyFunction.apply(logits, labels, ignore_index, reduction, block_v, M), (0, None, None)

    @staticmethod
    def backward(ctx, dloss, dlse, dnum_scored):
        logits, labels, lse, num_scored = ctx.saved_tensors
        logits, labels = logits.contiguous(), labels.contiguous()
        N, V = logits.shape
        scale = dloss.float() if num_scored is None else dloss.float() / num_scored  # a device scalar: no sync
        dx = torch.empty_like(logits)
        cross_entropy_bwd_kernel[(N,)](logits, labels, lse, scale.reshape(-1).contiguous(), dx, V, ctx.ignore_index,
                                       N // ctx.models, BLOCK=ctx.block, num_warps=NUM_WARPS)
        return dx, None, None, None, None, None


def triton_cross_entropy(logits, labels, ignore_index: int = -100, reduction: str = "mean", block_v: int = BLOCK_V):
    """Cross-entropy of logits [N, V] (any float dtype; float32 math) against labels [N] (ignore_index: not
    scored), "mean" over the scored rows or "sum"; differentiable in logits (the gradient in their dtype).
    Like F.cross_entropy, "mean" with no scored row is NaN. block_v: vocabulary entries per step along a row."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} must be 'mean' or 'sum'")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} must be [N, V] and labels {tuple(labels.shape)} [N]")
    return CrossEntropyFunction.apply(logits, labels, ignore_index, reduction, block_v, 1)[0]
