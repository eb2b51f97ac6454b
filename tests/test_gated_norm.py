"""The fused output norm (ops/gated_norm.py) against its float64 PyTorch form (nn.gated_deltanet.output_norm):
y and the gradients of o, the weight and the gate, every element written. The layer's use of it on the Triton
backend is tested with the fused short conv (test_short_conv.py).

On CPU the kernels run under the Triton interpreter in float32; the `gpu` tests run compiled, bf16 and float32.
"""
import pytest
from triton_markers import assert_close_to_reference, gpu_only, interpreter_only  # first: sets TRITON_INTERPRET
import torch

from gdn_exp.kernel_check import nan_poisoned_allocations
from gdn_exp.nn.gated_deltanet import output_norm
from gdn_exp.ops.gated_norm import triton_gated_rms_norm

# (shape of o, gated): row counts that do not fill the last program, a D that is not a power of 2
CASES = {"B2 T45 H2 V32 gated": ((2, 45, 2, 32), True), "B1 T33 H3 V24 gated": ((1, 33, 3, 24), True),
         "B2 T20 H1 V64 no gate": ((2, 20, 1, 64), False)}
GPU_CASES = {"B4 T1000 H4 V128 gated": ((4, 1000, 4, 128), True), "B2 T300 H2 V256 no gate": ((2, 300, 2, 256), False)}


def check(case, dtype, device, tolerance, out_dtype=None):
    """o and gate in dtype, y in out_dtype (default dtype)."""
    shape, gated = case
    gen = torch.Generator().manual_seed(shape[1])
    o = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = 1 + 0.1 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    gate = torch.randn(shape, generator=gen, dtype=torch.float64) if gated else None
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)

    def run(fn, o, weight, gate):
        o, weight = o.clone().requires_grad_(), weight.clone().requires_grad_()
        gate = None if gate is None else gate.clone().requires_grad_()
        y = fn(o, weight, gate, 1e-6)
        (y * dy.to(y)).sum().backward()
        return {"y": y.detach(), "do": o.grad, "dweight": weight.grad, "dgate": None if gate is None else gate.grad}

    ref = run(output_norm, o, weight, gate)
    with nan_poisoned_allocations():
        got = run(lambda *args: triton_gated_rms_norm(*args, out_dtype=out_dtype), o.to(device, dtype),
                  weight.to(device, torch.float32), None if gate is None else gate.to(device, dtype))
    assert got["y"].dtype == (out_dtype or dtype)
    assert_close_to_reference(got, ref, tolerance)


@interpreter_only
@pytest.mark.parametrize("case", list(CASES))
def test_fused_output_norm_matches_float64_cpu(case):
    check(CASES[case], torch.float32, "cpu", tolerance=1e-5)


@interpreter_only
def test_residual_stream_norm_cpu():
    """The model's norm of the residual stream under autocast: rows of d_model (4 rows per program at 1024, the
    last program part-filled), no gate, float32 in and bf16 out (a store, which the interpreter rounds right)."""
    check(((2, 9, 1024), False), torch.float32, "cpu", tolerance=1e-2, out_dtype=torch.bfloat16)


@interpreter_only
def test_model_norm_on_the_triton_backend_cpu():
    """AutocastRMSNorm under bf16 autocast: the fused kernel (backend "triton") gives torch's RMSNorm cast to
    bf16, and the same float32 gradients."""
    from gdn_exp.model import AutocastRMSNorm

    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(3, 5, 256, generator=gen), torch.randn(3, 5, 256, generator=gen)
    results = []
    for backend in ("triton", "torch"):
        norm = AutocastRMSNorm(256, 1e-6, backend)
        torch.nn.init.normal_(norm.weight, 1.0, 0.1, generator=torch.Generator().manual_seed(1))
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(xi)
        (y.float() * dy).sum().backward()
        results.append((y, xi.grad, norm.weight.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = results
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert (y.float() - y_ref.float()).abs().max() <= 2 ** -7 * y_ref.float().abs().max()  # bf16 rounding
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="weight"):
        triton_gated_rms_norm(torch.zeros(2, 3, 8), torch.ones(4))
    with pytest.raises(ValueError, match="gate"):
        triton_gated_rms_norm(torch.zeros(2, 3, 8), torch.ones(8), torch.zeros(2, 8))


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_fused_output_norm_matches_float64_gpu(case, dtype):
    check(GPU_CASES[case], dtype, "cuda", tolerance=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@gpu_only
def test_residual_stream_norm_gpu():
    check(((4, 1000, 1024), False), torch.float32, "cuda", tolerance=1e-2, out_dtype=torch.bfloat16)
