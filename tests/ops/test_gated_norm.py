"""The fused output norm (ops/gated_norm/kernel.py) against its float64 PyTorch form (reference.gated_rms_norm):
y and the gradients of o, the weight and the gate, every element written; the residual add fused into it
(`triton_add_rms_norm`) against reference.add_rms_norm: y, s and the gradients of x, delta and the weight, for
each of y and s used later or not. The layer's use of it on the Triton backend is tested with the fused short conv
(test_short_conv.py), the model's in test_model.py.

On CPU the kernels run under the Triton interpreter in float32; the `gpu` tests run compiled, bf16 and float32.
"""
import pytest
import torch

from gdn_exp.ops.compare import GPU_TOLERANCE, assert_close, nan_poisoned_allocations
from gdn_exp.ops.gated_norm import reference
from gdn_exp.ops.gated_norm.kernel import triton_add_rms_norm, triton_gated_rms_norm

# (shape of o, gated): row counts that do not fill the last program, a D that is not a power of 2
CASES = {"B2 T45 H2 V32 gated": ((2, 45, 2, 32), True), "B1 T33 H3 V24 gated": ((1, 33, 3, 24), True),
         "B2 T20 H1 V64 no gate": ((2, 20, 1, 64), False)}
GPU_CASES = {"B4 T1000 H4 V128 gated": ((4, 1000, 4, 128), True), "B2 T300 H2 V256 no gate": ((2, 300, 2, 256), False)}
# the add variant: (shape of x); which of y and s the loss uses (s alone: the new residual, y unused)
ADD_CASES = {"B2 T45 D32": (2, 45, 32), "B1 T33 D24": (1, 33, 24), "B2 T9 D1024": (2, 9, 1024)}
UPSTREAM = {"y and s": ("y", "s"), "y only": ("y",), "s only": ("s",)}


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

    ref = run(reference.gated_rms_norm, o, weight, gate)
    with nan_poisoned_allocations():
        got = run(lambda *args: triton_gated_rms_norm(*args, out_dtype=out_dtype), o.to(device, dtype),
                  weight.to(device, torch.float32), None if gate is None else gate.to(device, dtype))
    assert got["y"].dtype == (out_dtype or dtype)
    assert_close(got, ref, tolerance)


def check_add(shape, upstream, device, tolerance, dtype=torch.float32, out_dtype=None):
    """x float32, delta in dtype, y in out_dtype (default float32); upstream: the outputs the loss uses (UPSTREAM;
    the kernel gets None as the gradient of the others)."""
    gen = torch.Generator().manual_seed(shape[1])
    x, delta, dy, ds = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    weight = 1 + 0.1 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)

    def run(fn, x, delta, weight):
        x, delta, weight = (t.clone().requires_grad_() for t in (x, delta, weight))
        outputs, grads = dict(zip("ys", fn(x, delta, weight))), {"y": dy, "s": ds}
        torch.autograd.backward([outputs[name] for name in upstream],
                                [grads[name].to(outputs[name]) for name in upstream])
        # the weight gets no gradient without y (the kernel writes zeros, the reference None)
        return {"y": outputs["y"].detach(), "s": outputs["s"].detach(), "dx": x.grad, "ddelta": delta.grad,
                **({"dweight": weight.grad} if "y" in upstream else {})}

    ref = run(lambda x, delta, weight: reference.add_rms_norm(x, delta, weight, 1e-6), x, delta, weight)
    with nan_poisoned_allocations():
        got = run(lambda *args: triton_add_rms_norm(*args, out_dtype=out_dtype), x.to(device, torch.float32),
                  delta.to(device, dtype), weight.to(device, torch.float32))
    assert got["y"].dtype == (out_dtype or torch.float32) and got["s"].dtype == torch.float32
    assert got["dx"].dtype == torch.float32 and got["ddelta"].dtype == dtype
    assert_close(got, ref, tolerance)


@pytest.mark.interpreter
@pytest.mark.parametrize("upstream", list(UPSTREAM))
@pytest.mark.parametrize("case", list(ADD_CASES))
def test_fused_add_norm_matches_float64_cpu(case, upstream):
    check_add(ADD_CASES[case], UPSTREAM[upstream], "cpu", tolerance=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_fused_output_norm_matches_float64_cpu(case):
    check(CASES[case], torch.float32, "cpu", tolerance=1e-5)


@pytest.mark.interpreter
def test_residual_stream_norm_cpu():
    """The model's norm of the residual stream under autocast: rows of d_model (4 rows per program at 1024, the
    last program part-filled), no gate, float32 in and bf16 out (the interpreter truncates to bf16 where the GPU
    rounds to nearest: within the tolerance)."""
    check(((2, 9, 1024), False), torch.float32, "cpu", tolerance=1e-2, out_dtype=torch.bfloat16)


@pytest.mark.interpreter
@pytest.mark.parametrize("upstream", list(UPSTREAM))
def test_residual_stream_add_norm_cpu(upstream):
    """The same with the residual add, as in the model under bf16 autocast: float32 x, bf16 delta and y."""
    check_add((2, 9, 1024), UPSTREAM[upstream], "cpu", tolerance=1e-2, dtype=torch.bfloat16,
              out_dtype=torch.bfloat16)


@pytest.mark.interpreter
@pytest.mark.parametrize("with_delta", [False, True], ids=["norm", "add + norm"])
def test_model_norm_on_the_triton_backend_cpu(with_delta):
    """AutocastRMSNorm under bf16 autocast, (residual, bf16 delta or None) -> (y, new residual): the fused kernel
    (backend "triton") gives torch's residual + delta and RMSNorm cast to bf16, and the same gradients."""
    from gdn_exp.model import AutocastRMSNorm

    gen = torch.Generator().manual_seed(0)
    x, delta, dy, ds = (torch.randn(3, 5, 256, generator=gen) for _ in range(4))
    delta = delta.bfloat16() if with_delta else None
    results = []
    for backend in ("triton", "torch"):
        norm = AutocastRMSNorm(256, 1e-6, backend)
        torch.nn.init.normal_(norm.weight, 1.0, 0.1, generator=torch.Generator().manual_seed(1))
        xi, di = x.clone().requires_grad_(), None if delta is None else delta.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, s = norm(xi, di)
        ((y.float() * dy).sum() + (s * ds).sum()).backward()
        results.append((y, s, xi.grad, None if di is None else di.grad, norm.weight.grad))
    (y, s, dx, ddelta, dw), (y_ref, s_ref, dx_ref, ddelta_ref, dw_ref) = results
    assert y.dtype == y_ref.dtype == torch.bfloat16 and s.dtype == s_ref.dtype == torch.float32
    assert (y.float() - y_ref.float()).abs().max() <= 2 ** -7 * y_ref.float().abs().max()  # bf16 rounding
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ddelta, ddelta_ref)  # bf16, 1 ulp apart where the interpreter truncates
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="weight"):
        triton_gated_rms_norm(torch.zeros(2, 3, 8), torch.ones(4))
    with pytest.raises(ValueError, match="gate"):
        triton_gated_rms_norm(torch.zeros(2, 3, 8), torch.ones(8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="delta"):
        triton_add_rms_norm(torch.zeros(2, 3, 8), torch.zeros(3, 8), torch.ones(8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_fused_output_norm_matches_float64_gpu(case, dtype):
    check(GPU_CASES[case], dtype, "cuda", tolerance=GPU_TOLERANCE[dtype])


@pytest.mark.gpu
def test_residual_stream_norm_gpu():
    check(((4, 1000, 1024), False), torch.float32, "cuda", tolerance=1e-2, out_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("upstream", list(UPSTREAM))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_residual_stream_add_norm_gpu(dtype, upstream):
    """The model's residual add + norm: float32 x, delta and y in dtype (bf16: as under autocast)."""
    check_add((4, 1000, 1024), UPSTREAM[upstream], "cuda", tolerance=GPU_TOLERANCE[dtype],
              dtype=dtype, out_dtype=dtype)
