"""The Triton cross-entropy (ops/cross_entropy/kernel.py) against F.cross_entropy in float64: the loss and the
logits' gradient, every element written, with ignored rows, rows longer than one block, and -inf logits.

On CPU the kernels run under the Triton interpreter in float32; the `gpu` tests run compiled, bf16 and float32.
"""
import pytest
import torch
import torch.nn.functional as F

from gdn_exp.ops.compare import GPU_TOLERANCE, assert_close, nan_poisoned_allocations
from gdn_exp.ops import cross_entropy_loss
from gdn_exp.ops.cross_entropy.kernel import triton_cross_entropy

IGNORE = -100


def check(N, V, dtype, device, reduction, tolerance, neg_inf=False, block_v=4096):
    gen = torch.Generator().manual_seed(N * V)
    logits = 3 * torch.randn(N, V, generator=gen, dtype=torch.float64)
    if neg_inf:  # masked vocabulary entries, at the start of every row
        logits[:, : V // 3] = float("-inf")
        labels = torch.randint(V // 3, V, (N,), generator=gen)
    else:
        labels = torch.randint(0, V, (N,), generator=gen)
    labels[::3] = IGNORE
    dloss = 1.7  # an upstream gradient other than 1

    def run(fn, logits):
        logits = logits.clone().requires_grad_()
        loss = fn(logits, labels.to(logits.device), IGNORE, reduction)
        (loss * dloss).backward()
        return {"loss": loss.detach().reshape(1), "dlogits": logits.grad}

    ref = run(lambda x, y, i, r: F.cross_entropy(x, y, ignore_index=i, reduction=r), logits)
    with nan_poisoned_allocations():
        got = run(lambda *args: triton_cross_entropy(*args, block_v=block_v), logits.to(device, dtype))
    if neg_inf:  # F.cross_entropy's gradient there is exactly 0, as ours must be
        assert (got["dlogits"][:, : V // 3] == 0).all()
        got["dlogits"], ref["dlogits"] = got["dlogits"][:, V // 3 :], ref["dlogits"][:, V // 3 :]
    assert_close(got, ref, tolerance)


@pytest.mark.interpreter
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("N, V, neg_inf", [(7, 50, False), (5, 300, True)])
def test_cross_entropy_matches_float64_cpu(reduction, N, V, neg_inf):
    """Blocks of 64 along the vocabulary: V = 50 in one block with padding, V = 300 in five with a padded tail."""
    check(N, V, torch.float32, "cpu", reduction, tolerance=1e-5, neg_inf=neg_inf, block_v=64)


def test_reference_path_off_cuda():
    """Off CUDA `cross_entropy_loss` is F.cross_entropy on float32 logits, whatever their dtype."""
    logits = torch.randn(6, 11).to(torch.bfloat16)
    labels = torch.tensor([1, 2, IGNORE, 3, 0, 10])
    expected = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    assert torch.equal(cross_entropy_loss(logits, labels, IGNORE, backend="torch"), expected)
    assert torch.equal(cross_entropy_loss(logits, labels, IGNORE), expected)  # "auto" on CPU


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="reduction"):
        triton_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        triton_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("N, V, neg_inf", [(300, 32000, False), (64, 50257, True)])
def test_cross_entropy_matches_float64_gpu(dtype, N, V, neg_inf):
    check(N, V, dtype, "cuda", "mean", tolerance=GPU_TOLERANCE[dtype], neg_inf=neg_inf)
