"""The gated delta rule: its PyTorch forms (the chunkwise form equals the token-by-token oracle in float64:
outputs, final state and every gradient, on awkward lengths, K != V, strong and zero decay, beta in [0, 2],
varlen), the dispatcher, and the Triton kernels (chunk, recurrent, decode, and the chunk form without the delta
rule, "gla") against the float64 oracle.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) in float32 on small
shapes. The `gpu` tests run the full matrix in bfloat16 and float32 with compiled kernels. Every comparison prints
max-abs error and ||x - ref|| / ||ref|| per tensor (ops.compare) and runs with NaN-poisoned outputs.
"""
import os
import subprocess
import sys
import zlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from gdn_exp.ops import KernelUnavailableError, gated_delta_rule, gated_linear_attention, resolve_backend
from gdn_exp.ops.gated_delta_rule import check, chunk
from gdn_exp.ops.gated_delta_rule.check import Case, varlen_case
from gdn_exp.ops.gated_delta_rule.launch import DEFAULT_LAUNCH, ChunkLaunch
from gdn_exp.ops.gated_delta_rule.recurrent import triton_decode_step
from gdn_exp.ops.gated_delta_rule.reference import chunk_channel_gated_linear_attention
from gdn_exp.ops.reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

H100 = DEFAULT_LAUNCH.replace(sms=132)  # launch decisions as on an H100, on any machine
CPU = torch.device("cpu")

CPU_CASES = [
    Case(B=1, T=1, H=1, K=16, V=16),
    Case(B=1, T=63, H=1, K=16, V=32, initial_state=False),
    Case(B=1, T=64, H=1, K=32, V=16, gate="none"),
    Case(B=1, T=65, H=2, K=16, V=16, gate="forget"),
    varlen_case((1, 63, 1, 66), H=1, K=16, V=16),
    Case(B=1, T=65, H=1, K=16, V=16, grad_scale=1e-6),
]
SLOW_CPU_CASES = [
    Case(B=2, T=130, H=2, K=64, V=32, initial_state=False),
    varlen_case((64, 1, 129, 2), H=2, K=32, V=64, gate="forget"),
]


def assert_matches_oracle(case, mode, dtype, device, settings=None):
    failed, _ = check.check_case(case, mode, dtype, device, seed=zlib.crc32(case.name.encode()), settings=settings)
    assert not failed, f"{mode} {case.name}: {failed} above threshold or not finite"


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", list(check.KERNELS))
@pytest.mark.parametrize("case", CPU_CASES + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW_CPU_CASES],
                         ids=lambda c: c.name)
def test_kernel_matches_oracle_cpu(case, mode):
    assert_matches_oracle(case, mode, torch.float32, CPU)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", list(check.KERNELS))
def test_float16_inputs_cpu(mode):
    """float16 (numpy has it, unlike bfloat16) runs the 16-bit input path under the interpreter too."""
    assert_matches_oracle(Case(B=1, T=65, H=1, K=16, V=32), mode, torch.float16, CPU)


# Known limits of float16 inputs (docs/kernels.md), both in dh0, the float32 gradient of the initial state:
# - under a fully forgetting gate (g ~ -30) dh0 is ~1e-13, and the chunk backward (with or without the delta rule)
#   takes its gradient planes in float16, whose range ends at 6e-8 (and, with the delta rule, the decayed rows of
#   W, stored in float16): those rows flush to 0. bfloat16 and float32 inputs, and the recurrent mode, keep them.
# - upstream gradients of a real loss's size (1e-6, no loss scaling) are float16 subnormals once the kernels
#   take dO in the input dtype: dh0 is off by 2-20 % in every mode. Float16 training needs a loss scale.
FLOAT16_FORGET = "float16 chunk backward flushes dh0 ~1e-13 under a fully forgetting gate (docs/kernels.md)"
FLOAT16_SMALL_GRADIENTS = "float16 holds upstream gradients of 1e-6 as subnormals: dh0 off (docs/kernels.md)"


def float16_limit(case, mode, dtype):
    """The reason a case cannot pass in float16 (above), or None."""
    if dtype != torch.float16:
        return None
    if case.grad_scale < 1e-3:
        return FLOAT16_SMALL_GRADIENTS
    if mode != "recurrent" and case.gate == "forget" and case.initial_state:
        return FLOAT16_FORGET
    return None


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", list(check.KERNELS))
@pytest.mark.parametrize("case", [Case(B=1, T=65, H=1, K=16, V=32, gate="forget"),
                                  Case(B=1, T=65, H=1, K=16, V=32, grad_scale=1e-6)], ids=lambda c: c.name)
def test_float16_limits_cpu(case, mode, request):
    """The float16 limits hold (strict expected failures: a fix shows), and only where float16_limit says."""
    reason = float16_limit(case, mode, torch.float16)
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason))
    assert_matches_oracle(case, mode, torch.float16, CPU)


@pytest.mark.interpreter
def test_decode_step_updates_state_in_place():
    torch.manual_seed(0)
    B, H, K, V = 2, 2, 16, 32
    q, k = (torch.nn.functional.normalize(torch.randn(B, 1, H, K), dim=-1) for _ in range(2))
    v, g, beta = torch.randn(B, 1, H, V), -torch.rand(B, 1, H), 2 * torch.rand(B, 1, H)
    state = torch.randn(B, H, K, V)
    expected_o, expected_state = gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                                  mode="recurrent", backend="torch")
    storage = state.data_ptr()
    o = triton_decode_step(q, k, v, g, beta, state, scale=K ** -0.5)
    assert state.data_ptr() == storage
    torch.testing.assert_close(o, expected_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_decode_step_rejects_more_than_one_token():
    x = torch.zeros(1, 2, 1, 16)
    with pytest.raises(ValueError, match="T = 2"):
        triton_decode_step(x, x, x, x[..., 0], x[..., 0], torch.zeros(1, 1, 16, 16), scale=1.0)


@pytest.mark.interpreter
def test_triton_chunk_refuses_head_dims_its_state_block_cannot_hold():
    q = torch.zeros(1, 64, 1, 512)
    g = torch.zeros(1, 64, 1)
    with pytest.raises(ValueError, match="K <= 256, got K=512"):
        gated_delta_rule(q, q, q[..., :16], g, g, mode="chunk", backend="triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("launch", [dict(BV=16, num_warps=1), dict(BV=64, num_warps=8)], ids=["BV16", "BV64"])
def test_decode_launch_override_gives_the_default_result(launch):
    """A decode launch's V block splits the state's 32 columns over two programs (BV 16) or masks half of one
    (BV 64); either way the step computes what the default launch (one block of 32) does."""
    torch.manual_seed(2)
    B, H, K, V = 2, 2, 16, 32
    q, k = (torch.nn.functional.normalize(torch.randn(B, 1, H, K), dim=-1) for _ in range(2))
    v, g, beta = torch.randn(B, 1, H, V), -torch.rand(B, 1, H), torch.rand(B, 1, H)
    state = torch.randn(B, H, K, V)
    default_state, override_state = state.clone(), state.clone()
    default_o = triton_decode_step(q, k, v, g, beta, default_state, scale=K ** -0.5)
    override_o = triton_decode_step(q, k, v, g, beta, override_state, scale=K ** -0.5, launch=launch)
    torch.testing.assert_close(override_o, default_o, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(override_state, default_state, rtol=1e-6, atol=1e-6)


@pytest.mark.interpreter
def test_check_runs_the_forward_without_grad_too(monkeypatch):
    """Training keeps the states for backward and inference does not: different kernel variants, so the check
    compares the no-grad forward with the oracle as well. A kernel wrong only without grad must fail it."""
    calls, run_state_fwd = [], chunk.run_state_fwd

    def spy(*args, **kwargs):
        calls.append("writes O" if kwargs.get("out_dtype") else "stores states")
        return run_state_fwd(*args, **kwargs)

    monkeypatch.setattr(chunk, "run_state_fwd", spy)
    chunk_op = check.KERNELS["chunk"]
    case = Case(B=1, T=65, H=2, K=16, V=16)
    assert_matches_oracle(case, "chunk", torch.float32, CPU)
    assert calls == ["stores states", "writes O"]  # training, then inference (one "SM" here: wide blocks)
    x = check.make_inputs(case, torch.float32, CPU, seed=0)
    with torch.no_grad():  # inputs that require grad, under no_grad: no backward will come
        check.run_op(chunk_op, x, {n: t.requires_grad_() for n, t in check.case_inputs(x).items()})
    assert calls[2:] == ["writes O"]

    def wrong_without_grad(*args, **kwargs):
        o, state = chunk_op(*args, **kwargs)
        return (o if torch.is_grad_enabled() else o * 1.01), state

    monkeypatch.setitem(check.KERNELS, "chunk", wrong_without_grad)
    failed, _ = check.check_case(case, "chunk", torch.float32, CPU, verbose=False)
    assert failed == ["o (no grad)"]


def test_check_scales_the_upstream_gradients_of_a_case():
    """grad_scale puts a case's dO and dht at a real loss's size (same draws otherwise), so that a kernel which
    flushes small gradients fails the check."""
    base, small = Case(B=1, T=65, H=2, K=16, V=16), Case(B=1, T=65, H=2, K=16, V=16, grad_scale=1e-6)
    x, y = (check.make_inputs(c, torch.float32, CPU, seed=3) for c in (base, small))
    assert small.name == base.name + "-dO1e-06"
    for name in ("do", "dht"):
        torch.testing.assert_close(y[name], 1e-6 * x[name])
    torch.testing.assert_close(y["v"], x["v"])


def test_check_reports_a_case_that_raises_as_failed(monkeypatch):
    """A kernel that crashes (e.g. an illegal memory access on the GPU) fails its own row of the check table
    instead of stopping the whole check."""
    def crash(*args, **kwargs):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")
    monkeypatch.setattr(check, "check_case", crash)
    case = Case(B=1, T=65, H=2, K=32, V=64)
    mode, dtype, name, failed, _ = check.check_item(("chunk", torch.float32, case, CPU))
    assert (mode, dtype, name) == ("chunk", "float32", case.name)
    assert failed == ["raised RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered"]


@pytest.mark.parametrize("name, num_states, D, dtype, expected", [
    ("state_fwd", 128, 128, torch.bfloat16, (64, 2)),           # B8 H16: 256 programs of 64 columns
    ("state_bwd", 128, 128, torch.bfloat16, (64, 1)),
    ("state_bwd", 64, 128, torch.bfloat16, (64, 3)),            # B8 H8: 128 programs, one per SM (one wave)
    ("state_bwd", 48, 128, torch.bfloat16, (32, 2)),            # 96 programs of 64 would idle 36 SMs
    ("state_fwd", 64, 128, torch.bfloat16, (32, 3)),            # B4 H16, B8 H8: 128 programs of 64 would idle 4
    ("state_fwd", 16, 128, torch.bfloat16, (16, 4)),            # B1 H16: even 16 columns give only 128
    ("state_fwd", 2, 16, torch.bfloat16, (16, 4)),              # V = 16 caps the block
    ("state_fwd", 32, 256, torch.bfloat16, (64, 1)),            # K = 256: wide_state
    ("state_bwd", 32, 256, torch.bfloat16, (64, 1)),
    ("state_bwd", 16, 128, torch.float32, (32, 1)),             # float32 keeps its own settings
])
def test_state_pass_config_fills_the_gpu(name, num_states, D, dtype, expected):
    BV, launch = H100.state_pass_config(name, num_states, D, D, dtype, CPU)
    assert (BV, launch["num_stages"]) == expected


@pytest.mark.parametrize("num_states, K, V, dtype, expected", [
    (128, 128, 128, torch.bfloat16, False),   # 16-bit: never (the state pass and output kernel are faster)
    (2, 16, 16, torch.float16, False),
    (16, 256, 256, torch.bfloat16, False),
    (128, 64, 64, torch.float32, True),       # float32 in blocks of 64
    (2, 16, 16, torch.float32, True),         # or of all of V
    (128, 128, 128, torch.float32, False),    # float32 K = 128 runs blocks of 32
])
def test_forward_writes_output_only_float32_in_wide_blocks(num_states, K, V, dtype, expected):
    assert H100.forward_writes_output(num_states, K, V, dtype, CPU) == expected


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype, K, V", [(torch.float16, 16, 32), (torch.float32, 128, 64)])
def test_chunk_forward_with_the_output_kernel_cpu(dtype, K, V):
    """Inference stores the chunk states (16-bit: in float16) and runs chunk_output_fwd_kernel for 16-bit inputs
    and for float32 in narrow V blocks; on CPU (one "SM") float32 takes that path only at K = 128, so this test
    pretends to be an H100."""
    assert not H100.forward_writes_output(1, K, V, dtype, CPU)
    assert_matches_oracle(Case(B=1, T=65, H=1, K=K, V=V), "chunk", dtype, CPU, settings=H100)


@pytest.mark.parametrize("num_states, K, V, expected", [
    (128, 128, 128, True),           # B8 H16: blocks of 64
    (64, 128, 128, True),            # B8 H8 (the model's layer): blocks of 32
    (16, 128, 128, False),           # B1 H16 (T32768): blocks of 16
    (2, 16, 16, False),              # V = 16
    (32, 256, 256, False),           # K = 256
])
def test_state_pass_applies_a_inv_only_in_blocks_of_32_to_64(num_states, K, V, expected):
    assert H100.applies_a_inv(num_states, K, V, torch.bfloat16, CPU) == expected


@pytest.mark.interpreter
@pytest.mark.parametrize("apply", [True, False], ids=["applies_ainv", "reads_w_u"])
def test_chunk_forward_both_ways_of_forming_u_cpu(monkeypatch, apply):
    """The forward state pass either reads W and U~ written by the wy kernel or applies Ainv to K and V itself;
    the shape picks one (applies_a_inv), so each is forced here, in training and in inference, and both
    must match the oracle."""
    calls, run_state_fwd = [], chunk.run_state_fwd

    def spy(k, v, w, u, *args, **kwargs):
        calls.append(w is None and u is None)
        return run_state_fwd(k, v, w, u, *args, **kwargs)

    class Forced(ChunkLaunch):
        def applies_a_inv(self, *args):
            return apply

    monkeypatch.setattr(chunk, "run_state_fwd", spy)
    assert_matches_oracle(Case(B=1, T=65, H=2, K=16, V=32), "chunk", torch.float32, CPU, settings=Forced())
    assert calls == [apply, apply]  # training, then the check's forward without grad


@pytest.mark.parametrize("K, dtype, expected", [
    (128, torch.bfloat16, (128, 8)),    # one program per chunk reads dO, U, dU once
    (256, torch.bfloat16, (128, 8)),
    (64, torch.bfloat16, (64, 4)),      # K <= 64: 8 warps would be slower
    (128, torch.float32, (64, 4)),      # float32 keeps its own settings
])
def test_dqk_config(K, dtype, expected):
    config = DEFAULT_LAUNCH.dqk_config(K, 128, dtype)
    assert (config["BK"], config["num_warps"]) == expected


@pytest.mark.parametrize("V, dtype, expected", [
    (128, torch.bfloat16, (128, 8)),    # one program per chunk: Q, K read and Q K^T formed once
    (256, torch.bfloat16, (128, 8)),
    (64, torch.bfloat16, (64, 4)),
    (128, torch.float32, (64, 4)),      # float32 keeps its own settings
])
def test_output_config(V, dtype, expected):
    config = DEFAULT_LAUNCH.output_config(V, dtype)
    assert (config["BV"], config["num_warps"]) == expected


@pytest.mark.interpreter
@pytest.mark.parametrize("V", [128, 256])
def test_chunk_forward_in_wide_output_blocks_cpu(V):
    """16-bit inputs with V >= 128 run chunk_output_fwd_kernel in V blocks of 128 (one block at V = 128, two at
    V = 256). The interpreter runs float32 only, so this test gives float32 the 16-bit blocks."""
    class Wide(ChunkLaunch):
        def output_config(self, V, dtype):
            return DEFAULT_LAUNCH.output_config(V, torch.bfloat16)

    assert_matches_oracle(Case(B=1, T=65, H=1, K=32, V=V), "chunk", torch.float32, CPU, settings=Wide())


@pytest.mark.interpreter
@pytest.mark.parametrize("K, V", [(128, 64), (256, 32)])
def test_chunk_backward_in_wide_dqk_blocks_cpu(K, V):
    """16-bit inputs with K > 64 run chunk_dqk_bwd_kernel in K blocks of 128: all of K in one program at
    K = 128, two dG parts at K = 256, while chunk_wy_bwd_kernel walks K in blocks of 64. The interpreter runs
    float32 only, so this test gives float32 the 16-bit blocks."""
    class Wide(ChunkLaunch):
        def dqk_config(self, K, V, dtype):
            return DEFAULT_LAUNCH.dqk_config(K, V, torch.bfloat16)

    assert_matches_oracle(Case(B=1, T=65, H=1, K=K, V=V), "chunk", torch.float32, CPU, settings=Wide())


def test_gpu_check_covers_every_state_pass_setting():
    """The GPU check (check.py's full matrix, bf16, each case with grad and without) runs every state-pass
    setting that an H100 (132 SMs) can pick: each V block and launch of the state, one_wave_state_bwd and
    wide_state tables. A setting the check never runs would never be verified against the oracle."""
    covered = set()
    for case in check.full_matrix():
        num_states, K, V = (len(case.seqlens) if case.seqlens else case.B) * case.H, case.K, case.V
        def setting(name):
            bv, launch = H100.state_pass_config(name, num_states, K, V, torch.bfloat16, CPU)
            return name, bv, launch["num_stages"], K > 128
        covered |= {setting("state_fwd"), setting("state_bwd")}
    expected = {(name, bv, launch["num_stages"], False) for name, table in DEFAULT_LAUNCH.state.items()
                for bv, launch in table.items()}
    one_wave_block, one_wave_launch = DEFAULT_LAUNCH.one_wave_state_bwd
    expected.add(("state_bwd", one_wave_block, one_wave_launch["num_stages"], False))
    expected |= {(name, bv, launch["num_stages"], True) for name, (bv, launch) in DEFAULT_LAUNCH.wide_state.items()}
    assert covered == expected
    # so both ways of forming U in the forward pass are checked (asked as V = the block: one state, one SM)
    forms = {DEFAULT_LAUNCH.replace(sms=1).applies_a_inv(1, 128, bv, torch.bfloat16, CPU)
             for name, bv, _, wide in covered if name != "state_bwd" and not wide}
    assert forms == {True, False}


def test_decode_launch_rejects_a_block_that_is_not_a_power_of_two():
    x = torch.zeros(1, 1, 1, 16)
    with pytest.raises(ValueError, match=r"launch\['BV'\]=24 must be a power of two"):
        triton_decode_step(x, x, x, x[..., 0], x[..., 0], torch.zeros(1, 1, 16, 16), scale=1.0,
                           launch=dict(BV=24, num_warps=4))


@pytest.mark.interpreter
@pytest.mark.parametrize("op, mode, function", [
    (gated_delta_rule, "chunk", "ChunkFunction"),
    (gated_delta_rule, "recurrent", "RecurrentGatedDeltaRuleFunction"),
    (gated_linear_attention, "chunk", "ChunkFunction")])
def test_dispatch_runs_triton_kernels(op, mode, function):
    """backend="triton" reaches our kernels (their autograd Function) and agrees with the PyTorch path."""
    torch.manual_seed(1)
    q, k = (torch.nn.functional.normalize(torch.randn(1, 20, 1, 16), dim=-1) for _ in range(2))
    v, g, beta = torch.randn(1, 20, 1, 16), -torch.rand(1, 20, 1), torch.rand(1, 20, 1)
    v.requires_grad_()
    o_triton, _ = op(q, k, v, g, beta, mode=mode, backend="triton")
    assert o_triton.grad_fn.name() == function + "Backward"
    o_triton.sum().backward()
    dv_triton, v.grad = v.grad, None
    o_torch, _ = op(q, k, v, g, beta, mode=mode, backend="torch")
    o_torch.sum().backward()
    torch.testing.assert_close(o_triton, o_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv_triton, v.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("mode", list(check.KERNELS))
@pytest.mark.parametrize("case", check.full_matrix(), ids=lambda c: c.name)
@pytest.mark.gpu
def test_kernel_matches_oracle_gpu(case, mode, dtype, request):
    reason = float16_limit(case, mode, dtype)
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason))
    assert_matches_oracle(case, mode, dtype, torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.gpu
def test_decode_step_gpu(dtype):
    assert not check.check_decode(64, 16, 128, 128, dtype, torch.device("cuda"))


@pytest.mark.parametrize("dtype, shape", [
    ("bfloat16", "2,256,4,128,128"),    # 8 states: inference too runs narrow state-pass blocks + output kernel
    ("bfloat16", "8,128,16,128,128"),   # 128 states: inference's state pass writes O
    ("float32", "1,128,2,64,64"),
])
def test_chunk_kernels_compile_for_hopper(dtype, shape):
    """Every chunk kernel compiles for sm_90 with the launch settings it would get on an H100, within its
    shared memory: the interpreter runs the kernels' logic but never compiles them (compile_check)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "gdn_exp.dev.compile_check", "--dtype", dtype, "--shape", shape],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    compiled = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("chunk_")}
    assert compiled == {"chunk_wy_fwd_kernel", "chunk_state_fwd_kernel", "chunk_output_fwd_kernel",
                        "chunk_state_bwd_kernel", "chunk_dqk_bwd_kernel", "chunk_wy_bwd_kernel",
                        "chunk_gla_fwd_kernel", "chunk_gla_bwd_kernel"}


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


@pytest.mark.parametrize("final_state", [False, True], ids=["no_final_state", "final_state"])
@pytest.mark.parametrize("T", [40, 130, 256, 300])
def test_chunk_from_a_zero_state_matches_the_oracle(T, final_state, monkeypatch):
    """The training path: no initial state (the chunk form skips the zero state's terms), with and without the
    final state; GDN's chunk form and gated_linear_attention (one chunk, or chunks of 64 where one would be big)."""
    q, k, v, g, beta, _ = inputs = random_inputs(2, T, 2, 16, 8, decay=0.05, seed=T)
    do = torch.randn(2, T, 2, 8, dtype=torch.float64)

    def run(fn, **kwargs):
        o, ht = fn(q, k, v, g, beta, output_final_state=final_state, **kwargs)
        loss = (o * do).sum() + (ht.square().sum() if final_state else 0)
        return [o, *torch.autograd.grad(loss, inputs[:5]), *([ht] if final_state else [])]

    delta_ref, gla_ref = (run(recurrent_gated_delta_rule, use_delta=use_delta) for use_delta in (True, False))
    results = [(run(chunk_gated_delta_rule), delta_ref), (run(gated_linear_attention), gla_ref)]
    monkeypatch.setattr(sys.modules[gated_delta_rule.__module__], "GLA_ONE_CHUNK_ELEMENTS", 0)  # chunks of 64
    results.append((run(gated_linear_attention), gla_ref))
    for i, (out, ref) in enumerate(results):
        for x, r in zip(out, ref):
            assert torch.isfinite(x).all() and rms_ratio(x, r) < 1e-10, (i, rms_ratio(x, r))


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


def channel_decay(B, T, H, K, *, decay, seed=0):
    """g [B, T, H, K]: a log decay per key channel (GLA's gate), in [-decay, 0]."""
    gen = torch.Generator().manual_seed(seed)
    return (-decay * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)).requires_grad_()


def test_channel_decay_oracle_is_the_per_channel_update():
    q, k, v, _, beta, h0 = (x.detach() for x in random_inputs(1, 5, 1, 4, 3, decay=1.0))
    g = channel_decay(1, 5, 1, 4, decay=1.0).detach()
    S = h0[0, 0].clone()
    for t in range(5):
        S = g[0, t, 0].exp()[:, None] * S + torch.outer(k[0, t, 0], beta[0, t, 0] * v[0, t, 0])
    o, ht = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_delta=False)
    torch.testing.assert_close(ht[0, 0], S)
    torch.testing.assert_close(o[0, -1, 0], S.T @ (q[0, -1, 0] * 4 ** -0.5))


@pytest.mark.parametrize("T,decay,chunk_size", [(1, 1.0, 16), (37, 1.0, 16), (64, 30.0, 16), (50, 3.0, 64)],
                         ids=lambda x: str(x))
def test_channel_decay_chunk_form_matches_the_float64_oracle(T, decay, chunk_size):
    """The chunkwise form of a decay per key channel: outputs, final state and every gradient, from a random
    initial state; T not a multiple of the chunk, and decays up to e^-30 per token (exponents that overflow
    as exp(G) / exp(-G) factors)."""
    q, k, v, _, beta, h0 = random_inputs(2, T, 3, 8, 12, decay=decay, seed=T)
    inputs = [q, k, v, channel_decay(2, T, 3, 8, decay=decay, seed=T), beta, h0]
    do = torch.randn(2, T, 3, 12, dtype=torch.float64)
    dh = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    ref = outputs_and_grads(recurrent_gated_delta_rule, inputs, do, dh, use_delta=False)
    out = outputs_and_grads(partial(chunk_channel_gated_linear_attention, chunk_size=chunk_size), inputs, do, dh)
    for name, x, r in zip(NAMES, out, ref):
        assert torch.isfinite(x).all(), name
        assert rms_ratio(x, r) < 1e-10, (name, rms_ratio(x, r), (x - r).abs().max().item())


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_a_decay_shared_by_the_channels_is_the_scalar_decay(mode):
    """gated_linear_attention with g [B, T, H, K] equal across K gives what g [B, T, H] gives."""
    q, k, v, g, beta, h0 = (x.detach() for x in random_inputs(2, 40, 2, 8, 4, decay=1.0))
    scalar = gated_linear_attention(q, k, v, g, beta, initial_state=h0, output_final_state=True, mode=mode)
    channel = gated_linear_attention(q, k, v, g[..., None].expand(-1, -1, -1, 8), beta, initial_state=h0,
                                     output_final_state=True, mode=mode)
    for x, r in zip(channel, scalar):
        assert rms_ratio(x, r) < 1e-12


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
    with pytest.raises(ValueError, match=r"g must be \[B, T, H\] = \(2, 8, 2\); got \(2, 8, 2, 4\)"):
        gated_delta_rule(q, k, v, g[..., None].expand(-1, -1, -1, 4), beta)  # no delta rule per channel
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_delta_rule(q, k, v, g, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="cu_seqlens needs B = 1"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="mode="):
        gated_delta_rule(q, k, v, g, beta, mode="parallel")


def test_backend_resolution(monkeypatch):
    assert resolve_backend("auto", CPU) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelUnavailableError, match="backend=triton needs CUDA"):
        resolve_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", CPU) == "triton"
