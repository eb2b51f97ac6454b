"""The PyTorch forms of the op: chunkwise == token-by-token oracle in float64 (outputs, final state and every
gradient), on awkward lengths, K != V, strong and zero decay, beta in [0, 2], varlen; plus the dispatcher."""
import pytest
import torch
import torch.nn.functional as F

from gdn_exp.ops import KernelUnavailableError, gated_delta_rule, gated_linear_attention, resolve_backend
from gdn_exp.ops.reference import chunk_gated_delta_rule, recurrent_gated_delta_rule


def random_inputs(B, T, H, K, V, *, decay, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = -decay * torch.rand(B, T, H, generator=gen, dtype=dtype)
    beta = 2 * torch.rand(B, T, H, generator=gen, dtype=dtype)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, g, beta, h0)]


def outputs_and_grads(fn, inputs, do, dh, **kwargs):
    q, k, v, g, beta, h0 = inputs
    o, ht = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs)
    grads = torch.autograd.grad((o * do).sum() + (ht * dh).sum(), inputs)
    return [o, ht, *grads]


def rms_ratio(x, ref):
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


@pytest.mark.parametrize("use_delta", [True, False], ids=["delta", "gla"])
@pytest.mark.parametrize("T,K,V,decay", [(1, 16, 16, 1.0), (63, 32, 16, 1.0), (64, 16, 32, 0.0),
                                         (65, 16, 16, 30.0), (130, 8, 24, 3.0)],
                         ids=lambda x: str(x))
def test_chunk_matches_recurrent_oracle_in_float64(T, K, V, decay, use_delta):
    inputs = random_inputs(2, T, 3, K, V, decay=decay, seed=T)
    do = torch.randn(2, T, 3, V, dtype=torch.float64)
    dh = torch.randn(2, 3, K, V, dtype=torch.float64)
    ref = outputs_and_grads(recurrent_gated_delta_rule, inputs, do, dh, use_delta=use_delta)
    out = outputs_and_grads(chunk_gated_delta_rule, inputs, do, dh, use_delta=use_delta)
    for name, x, r in zip(NAMES, out, ref):
        assert torch.isfinite(x).all(), name
        assert rms_ratio(x, r) < 1e-10, (name, rms_ratio(x, r), (x - r).abs().max().item())


def test_varlen_equals_separate_sequences():
    lengths = [1, 70, 5, 64]
    T = sum(lengths)
    q, k, v, g, beta, _ = random_inputs(1, T, 2, 16, 16, decay=1.0)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    h0 = torch.randn(len(lengths), 2, 16, 16, dtype=torch.float64)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, h_n = recurrent_gated_delta_rule(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
                                              initial_state=h0[n : n + 1], output_final_state=True)
        assert rms_ratio(o[:, s:e], o_n) < 1e-12 and rms_ratio(ht[n : n + 1], h_n) < 1e-12


def test_recurrence_definition_on_one_step():
    """T = 1 against the recurrence written out by hand."""
    q, k, v, g, beta, h0 = (x.detach() for x in random_inputs(1, 1, 1, 4, 3, decay=1.0))
    S = h0[0, 0] * g[0, 0, 0].exp()
    u = beta[0, 0, 0] * (v[0, 0, 0] - S.T @ k[0, 0, 0])
    S = S + torch.outer(k[0, 0, 0], u)
    o, ht = gated_delta_rule(q, k, v, g, beta, scale=0.5, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o[0, 0, 0], S.T @ (0.5 * q[0, 0, 0]))
    torch.testing.assert_close(ht[0, 0], S)


def test_gated_linear_attention_is_the_no_delta_update():
    q, k, v, g, beta, h0 = (x.detach() for x in random_inputs(1, 5, 1, 4, 3, decay=1.0))
    S = h0[0, 0].clone()
    for t in range(5):
        S = S * g[0, t, 0].exp() + torch.outer(k[0, t, 0], beta[0, t, 0] * v[0, t, 0])
    _, ht = gated_linear_attention(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(ht[0, 0], S)


def test_float32_inputs_give_float32_outputs_close_to_float64():
    inputs = random_inputs(2, 100, 2, 32, 32, decay=1.0)
    o64, h64 = gated_delta_rule(*[x.detach() for x in inputs[:5]], initial_state=inputs[5].detach(),
                                output_final_state=True)
    o32, h32 = gated_delta_rule(*[x.detach().float() for x in inputs[:5]], initial_state=inputs[5].detach().float(),
                                output_final_state=True)
    assert o32.dtype == torch.float32 and h32.dtype == torch.float32
    assert rms_ratio(o32.double(), o64) < 1e-5 and rms_ratio(h32.double(), h64) < 1e-5


def test_bad_shapes_and_options_raise_clear_errors():
    q, k, v, g, beta, h0 = (x.detach() for x in random_inputs(2, 8, 2, 4, 4, decay=1.0))
    with pytest.raises(ValueError, match="g must be"):
        gated_delta_rule(q, k, v, g[:, :4], beta)
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_delta_rule(q, k, v, g, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="cu_seqlens needs B = 1"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="mode="):
        gated_delta_rule(q, k, v, g, beta, mode="parallel")


def test_backend_resolution(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="backend=triton needs CUDA"):
        resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
