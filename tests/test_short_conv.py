"""The fused short conv + SiLU + L2 norm kernels (ops/short_conv.py) against the float64 PyTorch chain
(nn.gated_deltanet.qkv_pointwise): outputs and gradients of x and the weight, every element written.

On CPU the kernels run under the Triton interpreter in float32; the `gpu` tests run compiled, bf16 and float32.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

from gdn_exp.kernel_check import nan_poisoned_allocations  # noqa: E402
from gdn_exp.nn import GatedDeltaNet  # noqa: E402
from gdn_exp.nn.conv import positions_in_sequence  # noqa: E402
from gdn_exp.nn.gated_deltanet import qkv_pointwise  # noqa: E402
from gdn_exp.ops.short_conv import triton_short_conv_silu  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="CPU tests need TRITON_INTERPRET=1")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                              reason="needs CUDA and compiled kernels (TRITON_INTERPRET=0)")

# (B, T, H, K, V, W, normalise q and k, packed sequence lengths or None)
CASES = {
    "B2 T45 K16 V32": (2, 45, 2, 16, 32, 4, True, None),
    "B1 T70 K24 V16 no-norm W3": (1, 70, 1, 24, 16, 3, False, None),
    "packed 5+1+33+26": (1, 65, 2, 16, 16, 4, True, [5, 1, 33, 26]),
}
GPU_CASES = {
    "B4 T1000 K128 V128": (4, 1000, 4, 128, 128, 4, True, None),
    "B2 T300 K64 V128 no-norm": (2, 300, 2, 64, 128, 4, False, None),
    "packed 700+1+323": (1, 1024, 2, 128, 256, 4, True, [700, 1, 323]),
}


def check(case, dtype, device, tolerance):
    B, T, H, K, V, W, norm, seqlens = case
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(B, T, H * (2 * K + V), generator=gen, dtype=torch.float64)
    weight = torch.randn(H * (2 * K + V), W, generator=gen, dtype=torch.float64) / W ** 0.5
    douts = [torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for D in (K, K, V)]
    position = None
    if seqlens is not None:
        position = positions_in_sequence(torch.tensor([0] + seqlens).cumsum(0), T)

    def run(fn, x, weight):
        x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        outs = fn(x, weight)
        sum((o * d.to(o)).sum() for o, d in zip(outs, douts)).backward()
        return [o.detach() for o in outs] + [x.grad, weight.grad]

    ref = run(lambda x, w: qkv_pointwise(x, w, None, position, H, K, V, norm)[:3], x, weight)
    with nan_poisoned_allocations():
        got = run(lambda x, w: triton_short_conv_silu(x, w, ((H, K, norm), (H, K, norm), (H, V, False)),
                                                      None if position is None else position.to(device)),
                  x.to(device, dtype), weight.to(device, torch.float32))
    for name, a, b in zip(["q", "k", "v", "dx", "dweight"], got, ref):
        assert a.shape == b.shape and torch.isfinite(a).all(), f"{name}: not finite (an element not written?)"
        ratio = ((a.double().cpu() - b).norm() / b.norm()).item()
        assert ratio < tolerance, f"{name}: ||got - ref|| / ||ref|| = {ratio:.2e} >= {tolerance:.0e}"


@interpreter_only
@pytest.mark.parametrize("case", list(CASES))
def test_fused_short_conv_matches_float64_chain_cpu(case):
    check(CASES[case], torch.float32, "cpu", tolerance=1e-5)


def test_parts_must_cover_the_channels():
    with pytest.raises(ValueError, match="do not add up"):
        triton_short_conv_silu(torch.zeros(1, 4, 10), torch.zeros(10, 4), ((1, 4, True),))


@interpreter_only
def test_layer_uses_the_fused_kernel_on_the_triton_backend():
    """backend=triton (the interpreter here) runs the fused kernel and equals the PyTorch backend's layer."""
    torch.manual_seed(0)
    layers = [GatedDeltaNet(32, 2, 16, backend=b) for b in ("torch", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 40, 32)
    ys = [layer(x)[0] for layer in layers]
    for y in ys:
        y.square().sum().backward()
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layers[1].conv.weight.grad, layers[0].conv.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_fused_short_conv_matches_float64_chain_gpu(case, dtype):
    check(GPU_CASES[case], dtype, "cuda", tolerance=1e-2 if dtype == torch.bfloat16 else 1e-5)
