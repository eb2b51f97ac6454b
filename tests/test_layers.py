"""Layers: the Gated DeltaNet switches, chunk == recurrent == cached streaming, packed sequences, causality."""
import math

import pytest
import torch
import torch.nn.functional as F

from gdn_exp.nn import Attention, GatedDeltaNet, ShortConvolution

D_MODEL, HEADS, HEAD_DIM = 32, 2, 16


def make_gdn(**switches) -> GatedDeltaNet:
    torch.manual_seed(0)
    return GatedDeltaNet(D_MODEL, HEADS, HEAD_DIM, **switches).double()


def random_input(B, T, D=D_MODEL, seed=1):
    return torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# switch -> (its ablation value, the parameters the ablation removes)
SWITCHES = {
    "use_short_conv": (False, {"conv.weight"}),
    "use_output_gate": (False, {"g_proj.weight"}),
    "use_qk_l2norm": (False, set()),
    "use_gate": (False, {"a_proj.weight", "A_log", "dt_bias"}),
    "use_delta": (False, set()),
    "use_beta": (False, {"b_proj.weight"}),
    "allow_neg_eigval": (True, set()),
}


@pytest.mark.parametrize("switch", SWITCHES)
def test_switch_removes_its_parameters_and_changes_the_output(switch):
    value, removed = SWITCHES[switch]
    full, ablated = make_gdn(), make_gdn(**{switch: value})
    full_names, ablated_names = set(full.state_dict()), set(ablated.state_dict())
    assert full_names - ablated_names == removed and ablated_names <= full_names
    ablated.load_state_dict({k: v for k, v in full.state_dict().items() if k not in removed})
    x = random_input(2, 12)
    assert (full(x)[0] - ablated(x)[0]).abs().max() > 1e-3


def test_no_gate_is_zero_decay():
    full, no_gate = make_gdn(), make_gdn(use_gate=False)
    no_gate.load_state_dict(full.state_dict(), strict=False)
    with torch.no_grad():
        full.A_log.fill_(-math.inf)  # g = -exp(A_log) * softplus(.) = 0
    x = random_input(2, 12)
    torch.testing.assert_close(full(x)[0], no_gate(x)[0], rtol=0, atol=1e-12)


def test_no_beta_is_beta_one():
    # with allow_neg_eigval and a zero b_proj, beta = 2 * sigmoid(0) = 1
    doubled, no_beta = make_gdn(allow_neg_eigval=True), make_gdn(use_beta=False)
    no_beta.load_state_dict(doubled.state_dict(), strict=False)
    with torch.no_grad():
        doubled.b_proj.weight.zero_()
    x = random_input(2, 12)
    torch.testing.assert_close(doubled(x)[0], no_beta(x)[0], rtol=0, atol=1e-12)


def test_decay_init_follows_mamba2():
    torch.manual_seed(0)
    layer = GatedDeltaNet(D_MODEL, 64, HEAD_DIM)
    A, dt = layer.A_log.exp(), F.softplus(layer.dt_bias)
    assert A.min() >= 1 and A.max() <= 16
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert layer.no_weight_decay_params == ("A_log", "dt_bias")


ABLATIONS = [{}] + [{switch: value} for switch, (value, _) in SWITCHES.items()]


@pytest.mark.parametrize("switches", ABLATIONS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "full")
def test_chunk_equals_recurrent_equals_cached_steps(switches):
    layer = make_gdn(**switches)
    x = random_input(2, 70).requires_grad_()  # 70 tokens: one full chunk of 64 and a partial one
    chunk, _ = layer(x)
    (grad_chunk,) = torch.autograd.grad(chunk.square().sum(), x)
    layer.set_mode("recurrent")
    recurrent, _ = layer(x)
    (grad_recurrent,) = torch.autograd.grad(recurrent.square().sum(), x)
    torch.testing.assert_close(chunk, recurrent, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_chunk, grad_recurrent, rtol=0, atol=1e-10)

    layer.set_mode("chunk")  # a chunked prefix, a second chunk, then one token at a time
    with torch.no_grad():
        first, cache = layer(x[:, :40], use_cache=True)
        second, cache = layer(x[:, 40:66], cache=cache, use_cache=True)
        steps = [first, second]
        for t in range(66, 70):
            step, cache = layer(x[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(step)
    torch.testing.assert_close(torch.cat(steps, dim=1), chunk.detach(), rtol=0, atol=1e-10)


LAYERS = {
    "gdn": make_gdn,
    "gdn_no_conv": lambda: make_gdn(use_short_conv=False),
    "attention": lambda: Attention(D_MODEL, 4).double(),
    "sliding_window": lambda: Attention(D_MODEL, 4, window=3).double(),
    "conv": lambda: ShortConvolution(D_MODEL, 4).double(),
}


@pytest.mark.parametrize("name", LAYERS)
def test_packed_sequences_equal_separate_runs(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    lengths = [5, 1, 12, 7]
    x = random_input(1, sum(lengths))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed, _ = layer(x, cu_seqlens=cu_seqlens)
    separate = torch.cat([layer(part)[0] for part in x.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
def test_future_tokens_do_not_change_past_outputs(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = random_input(2, 16)
    changed = x.clone()
    changed[:, 9] += 1.0
    y, y_changed = layer(x)[0], layer(changed)[0]
    torch.testing.assert_close(y[:, :9], y_changed[:, :9], rtol=0, atol=0)
    assert (y[:, 9] - y_changed[:, 9]).abs().max() > 1e-3


def test_short_conv_reaches_exactly_kernel_size_tokens_back():
    conv = ShortConvolution(D_MODEL, 4).double()
    x = random_input(1, 16)
    changed = x.clone()
    changed[:, 5] += 1.0
    moved = (conv(x)[0] - conv(changed)[0]).abs().amax(dim=-1)[0]              # [T]
    assert moved[:5].max() == 0 and moved[5:9].min() > 0 and moved[9:].max() == 0


@pytest.mark.parametrize("name", ["attention", "sliding_window", "conv"])
def test_cached_steps_equal_full_sequence(name):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = random_input(2, 12)
    full, _ = layer(x)
    y, cache = layer(x[:, :5], use_cache=True)
    outputs = [y]
    for t in range(5, 12):
        y, cache = layer(x[:, t : t + 1], cache=cache, use_cache=True)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=0, atol=1e-10)


def test_sliding_window_sees_only_the_window():
    # RoPE is relative, so a windowed query attends exactly as full attention over its window alone
    torch.manual_seed(0)
    window = Attention(D_MODEL, 4, window=3).double()
    full = Attention(D_MODEL, 4).double()
    full.load_state_dict(window.state_dict())
    x = random_input(2, 10)
    y, _ = window(x)
    for t in range(10):
        y_full, _ = full(x[:, max(0, t - 2) : t + 1])
        torch.testing.assert_close(y[:, t], y_full[:, -1], rtol=0, atol=1e-10)


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="head_dim \\* expand_v"):
        GatedDeltaNet(D_MODEL, HEADS, HEAD_DIM, expand_v=1.3)
    with pytest.raises(ValueError, match="mode='parallel'"):
        GatedDeltaNet(D_MODEL, HEADS, HEAD_DIM, mode="parallel")
    with pytest.raises(ValueError, match="not divisible"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="even for RoPE"):
        Attention(30, 2)



@pytest.mark.interpreter
@pytest.mark.parametrize("use_delta", [True, False], ids=["gdn", "no_delta"])
def test_triton_backend_matches_torch_backend(use_delta):
    # a chunked prefill, then a one-token step; the kernels get the layer's non-contiguous q, k, v views
    torch.manual_seed(0)
    layer = GatedDeltaNet(D_MODEL, HEADS, HEAD_DIM, use_delta=use_delta)
    x = random_input(2, 41).float()
    outputs = {}
    with torch.no_grad():
        for backend in ("torch", "triton"):
            layer.backend = backend
            prefill, cache = layer(x[:, :40], use_cache=True)
            step, cache = layer(x[:, 40:], cache=cache, use_cache=True)
            outputs[backend] = (prefill, step, cache["recurrent"])
    for triton_output, torch_output in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(triton_output, torch_output, rtol=1e-4, atol=1e-5)


def test_autocast_runs_the_op_in_bf16(monkeypatch):
    """Under bf16 autocast the op must get bf16 q, k, v (a float32 conv weight or F.normalize would promote
    them, sending the op down its float32 path: that cost the GDN model 3x on the GPU)."""
    import gdn_exp.nn.gated_deltanet as gdn_module

    seen, original = [], gdn_module.gated_delta_rule

    def spy(q, k, v, g, beta, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, g.dtype))
        return original(q, k, v, g, beta, **kwargs)

    monkeypatch.setattr(gdn_module, "gated_delta_rule", spy)
    torch.manual_seed(0)
    layer = GatedDeltaNet(D_MODEL, HEADS, HEAD_DIM)
    x = torch.randn(2, 16, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    y.float().sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32)]
    assert y.dtype == torch.bfloat16 and layer.conv.weight.grad.dtype == torch.float32
    with torch.no_grad():  # and it computes the same function as float32, to bf16 accuracy
        reference, _ = layer(x)
    assert (y.float() - reference).norm() < 0.05 * reference.norm()

