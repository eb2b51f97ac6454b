"""The fused short conv + SiLU + L2 norm kernels (ops/short_conv/kernel.py) against their float64 PyTorch form
(ops/short_conv/reference.py): outputs and gradients of x and the weight, every element written.

On CPU the kernels run under the Triton interpreter in float32; the `gpu` tests run compiled, bf16 and float32.
"""
import pytest
import torch

from gdn_exp.ops.compare import GPU_TOLERANCE, assert_close, nan_poisoned_allocations
from gdn_exp.nn import GatedDeltaNet
from gdn_exp.nn.conv import positions_in_sequence
from gdn_exp.ops import short_conv_silu

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
        return dict(zip(["q", "k", "v", "dx", "dweight"], [o.detach() for o in outs] + [x.grad, weight.grad]))

    parts = ((H, K, norm), (H, K, norm), (H, V, False))
    ref = run(lambda x, w: short_conv_silu(x, w, parts, position=position, backend="torch")[0], x, weight)
    with nan_poisoned_allocations():
        got = run(lambda x, w: short_conv_silu(x, w, parts, position=None if position is None else position.to(device),
                                               backend="triton")[0],
                  x.to(device, dtype), weight.to(device, torch.float32))
    assert_close(got, ref, tolerance)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_fused_short_conv_matches_float64_chain_cpu(case):
    check(CASES[case], torch.float32, "cpu", tolerance=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parts_must_cover_the_channels(backend):
    with pytest.raises(ValueError, match="do not add up"):
        short_conv_silu(torch.zeros(1, 4, 10), torch.zeros(10, 4), ((1, 4, True),), backend=backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("use_output_gate", [True, False], ids=["gated", "no gate"])
def test_layer_on_the_triton_backend_equals_the_torch_backend(use_output_gate):
    """backend=triton (the interpreter here) runs the fused short conv and the fused output norm
    (ops/gated_norm); output and every parameter's gradient equal the PyTorch backend's layer."""
    torch.manual_seed(0)
    layers = [GatedDeltaNet(32, 2, 16, use_output_gate=use_output_gate, backend=b) for b in ("torch", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 40, 32)
    ys = [layer(x)[0] for layer in layers]
    for y in ys:
        y.square().sum().backward()
    got = {"y": ys[1], **{name: p.grad for name, p in layers[1].named_parameters()}}
    ref = {"y": ys[0], **{name: p.grad for name, p in layers[0].named_parameters()}}
    assert_close(got, {name: t.double() for name, t in ref.items()}, tolerance=1e-5)  # float32 rounding


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_fused_short_conv_matches_float64_chain_gpu(case, dtype):
    check(GPU_CASES[case], dtype, "cuda", tolerance=GPU_TOLERANCE[dtype])
