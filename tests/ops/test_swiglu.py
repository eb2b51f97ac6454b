"""The fused SwiGLU step (ops/swiglu/kernel.py) against silu(a) * b (reference.py) in float64: h and the gradients
of a and b, every element written, with sizes that do not fill the last block and saturated sigmoids (|a| ~ 30);
and the MLP on the Triton backend against the PyTorch one.

On CPU the kernels run under the Triton interpreter in float32; the `gpu` tests run compiled, bf16 and float32.
"""
import pytest
import torch
import torch.nn.functional as F

from gdn_exp.ops.compare import GPU_TOLERANCE, assert_close, nan_poisoned_allocations
from gdn_exp.nn import SwiGLU
from gdn_exp.ops.swiglu import reference
from gdn_exp.ops.swiglu.kernel import triton_swiglu

# shape, scale of a: element counts that are not multiples of BLOCK (1024), one block only partly filled
CASES = {"3x5x7": ((3, 5, 7), 1.0), "2x45x352": ((2, 45, 352), 1.0), "4x1000 a~30": ((4, 1000), 30.0)}
GPU_CASES = {"4x1000x2736": ((4, 1000, 2736), 1.0), "2x300x352 a~30": ((2, 300, 352), 30.0)}


def check(case, dtype, device, tolerance):
    shape, a_scale = case
    gen = torch.Generator().manual_seed(shape[-1])
    a = a_scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    b, dh = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))

    def run(fn, a, b):
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        h = fn(a, b)
        (h * dh.to(h)).sum().backward()
        return {"h": h.detach(), "da": a.grad, "db": b.grad}

    ref = run(reference.swiglu, a, b)
    with nan_poisoned_allocations():
        got = run(triton_swiglu, a.to(device, dtype), b.to(device, dtype))
    assert got["h"].dtype == got["da"].dtype == got["db"].dtype == dtype
    assert_close(got, ref, tolerance)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: exp(-a) = inf at a < -88, sigmoid 0
@pytest.mark.parametrize("case", list(CASES))
def test_swiglu_matches_float64_cpu(case):
    check(CASES[case], torch.float32, "cpu", tolerance=1e-6)


@pytest.mark.interpreter
def test_non_contiguous_inputs_cpu():
    """Transposed a and b (as views) give the result of their contiguous copies."""
    a, b = torch.randn(2, 30, 20).transpose(1, 2), torch.randn(2, 30, 20).transpose(1, 2)
    torch.testing.assert_close(triton_swiglu(a, b), F.silu(a) * b)


@pytest.mark.interpreter
def test_mlp_on_the_triton_backend_equals_the_torch_backend():
    """SwiGLU(backend="triton") (the interpreter here): same output and parameter gradients as backend="torch",
    with the same state_dict."""
    torch.manual_seed(0)
    mlps = [SwiGLU(32, 96, backend=backend) for backend in ("torch", "triton")]
    mlps[1].load_state_dict(mlps[0].state_dict())
    x = torch.randn(2, 40, 32)
    ys = [mlp(x) for mlp in mlps]
    for y in ys:
        y.square().sum().backward()
    got = {"y": ys[1], **{name: p.grad for name, p in mlps[1].named_parameters()}}
    ref = {"y": ys[0], **{name: p.grad for name, p in mlps[0].named_parameters()}}
    assert_close(got, {name: t.double() for name, t in ref.items()}, tolerance=1e-5)  # float32 rounding


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="same shape and dtype"):
        triton_swiglu(torch.zeros(2, 8), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same shape and dtype"):
        triton_swiglu(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_swiglu_matches_float64_gpu(case, dtype):
    check(GPU_CASES[case], dtype, "cuda", tolerance=GPU_TOLERANCE[dtype])
