"""Correctness matrix of the Triton gated-delta kernels against the float64 oracle (`gdn-bench check`).

    python -m gdn_exp.ops.gated_delta_rule.check            # full matrix on CUDA: every kernel, bfloat16, float32
    python -m gdn_exp.ops.gated_delta_rule.check --quick    # the short cases only
    TRITON_INTERPRET=1 python -m gdn_exp.ops.gated_delta_rule.check --quick --device cpu   # without a GPU

Cases run in --jobs worker processes sharing the GPU (Triton compilation dominates the run time).

Kernels: the chunk and recurrent forms of the gated delta rule, the chunk form without the delta rule ("gla",
scalar-decay linear attention, against the oracle's no-delta loop) and the decode step. Every case draws fresh seeded inputs (L2-normalised q and k, beta in [0, 2], g in the case's regime), runs
the kernel with NaN-poisoned allocations and random upstream gradients on o and final_state, and compares
o, final_state and every gradient with the oracle run in float64 on the same (dtype-rounded) inputs, by
||x - ref|| / ||ref||. A case that raises (an illegal memory access from a miscompiled kernel) fails alone; the
others still run. Prints a pass/fail table with the card, date and versions; exits 1 on any failure.
Imports only torch and triton (the GPU image has no hydra or wandb).
"""
import argparse
import concurrent.futures
import datetime
import functools
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from gdn_exp.ops.compare import compare, nan_poisoned_allocations
from gdn_exp.ops.gated_delta_rule import reference
from gdn_exp.ops.gated_delta_rule.chunk import triton_chunk_gated_delta_rule
from gdn_exp.ops.gated_delta_rule.chunk_gla import triton_chunk_gated_linear_attention
from gdn_exp.ops.gated_delta_rule.recurrent import triton_decode_step, triton_recurrent_gated_delta_rule

TENSORS = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0")
BF16_THRESHOLDS = dict(o=5e-3, final_state=5e-3, dq=8e-3, dk=8e-3, dv=8e-3, dh0=8e-3, dg=2e-2, dbeta=2e-2)
THRESHOLDS = {torch.bfloat16: BF16_THRESHOLDS, torch.float16: BF16_THRESHOLDS,
              torch.float32: {name: 1e-4 for name in TENSORS}}
KERNELS = {"chunk": triton_chunk_gated_delta_rule, "recurrent": triton_recurrent_gated_delta_rule,
           "gla": triton_chunk_gated_linear_attention}  # gla: no delta rule (the no_delta ablation)
# log decay g per token: "none" ~ 0 (no decay), "mixed" log-uniform in [-30, -1e-3], "forget" ~ -30
GATE_REGIMES = ("none", "mixed", "forget")


@dataclass(frozen=True)
class Case:
    """One input configuration. seqlens: lengths of packed sequences (B must be 1), or None for [B, T].
    grad_scale multiplies the upstream gradients (a real loss's are far below the unit normal's)."""
    B: int
    T: int
    H: int
    K: int
    V: int
    initial_state: bool = True
    gate: str = "mixed"
    seqlens: Optional[tuple] = None
    grad_scale: float = 1.0

    @property
    def name(self) -> str:
        shape = f"varlen{len(self.seqlens)}-T{self.T}" if self.seqlens else f"B{self.B}-T{self.T}"
        grads = "" if self.grad_scale == 1.0 else f"-dO{self.grad_scale:g}"
        return f"{shape}-H{self.H}-K{self.K}-V{self.V}-h0{'on' if self.initial_state else 'off'}-g{self.gate}{grads}"


def varlen_case(seqlens, H, K, V, **kwargs) -> Case:
    return Case(B=1, T=sum(seqlens), H=H, K=K, V=V, seqlens=tuple(seqlens), **kwargs)


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int):
    """Inputs in `dtype` plus float32 upstream gradients; dict with q, k, v, g, beta, initial_state,
    cu_seqlens, do, dht."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, K, V = case.B, case.T, case.H, case.K, case.V
    N = len(case.seqlens) if case.seqlens else B

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    if case.gate == "none":
        g = -1e-3 * rand(B, T, H)
    elif case.gate == "forget":
        g = -30 + rand(B, T, H)
    else:
        g = -torch.exp(math.log(1e-3) + (math.log(30) - math.log(1e-3)) * rand(B, T, H))
    x = dict(q=torch.nn.functional.normalize(randn(B, T, H, K), dim=-1),
             k=torch.nn.functional.normalize(randn(B, T, H, K), dim=-1),
             v=randn(B, T, H, V), g=g, beta=2 * rand(B, T, H))
    x = {name: t.to(device=device, dtype=dtype) for name, t in x.items()}
    x["initial_state"] = randn(N, H, K, V).to(device) if case.initial_state else None
    x["cu_seqlens"] = (torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()], device=device)
                       if case.seqlens else None)
    x["do"], x["dht"] = ((case.grad_scale * randn(*shape)).to(device) for shape in ((B, T, H, V), (N, H, K, V)))
    return x


def case_inputs(x) -> dict:
    return {name: x[name] for name in ("q", "k", "v", "g", "beta", "initial_state") if x[name] is not None}


def run_op(fn, x, inputs):
    """fn on inputs (case_inputs, maybe cast) with x's scale and packed sequences: (o, final state)."""
    return fn(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], scale=x["q"].shape[-1] ** -0.5,
              initial_state=inputs.get("initial_state"), output_final_state=True, cu_seqlens=x["cu_seqlens"])


def run_with_grads(fn, x, compute_dtype=None):
    """Runs fn on x's inputs (cast to compute_dtype if given), backpropagates x's upstream gradients;
    returns {name: tensor} for TENSORS (dh0 only with an initial state)."""
    inputs = {name: (t.to(compute_dtype) if compute_dtype else t.clone()).requires_grad_()
              for name, t in case_inputs(x).items()}
    o, final_state = run_op(fn, x, inputs)
    loss = (o * x["do"].to(o.dtype)).sum() + (final_state * x["dht"].to(final_state.dtype)).sum()
    loss.backward()
    out = dict(o=o.detach(), final_state=final_state.detach())
    out.update({"d" + name if name != "initial_state" else "dh0": t.grad for name, t in inputs.items()})
    return out


def oracle(x, use_delta: bool = True):
    """float64 oracle on x's inputs: the token-by-token loop, whose autograd keeps every state, or for the
    largest cases (over 1.5e8 state elements in total) the float64 chunk form. The chunk form matches the loop
    to ~1e-15 absolute, but its dg is off by ~1e-3 relative when g ~ -30 makes dg itself ~1e-12, so the
    matrix runs that regime only at loop-sized shapes. use_delta=False: scalar-decay linear attention."""
    B, T, H, K = x["q"].shape
    fn = (reference.recurrent_gated_delta_rule if B * T * H * K * x["v"].shape[-1] <= 1.5e8
          else reference.chunk_gated_delta_rule)
    return run_with_grads(functools.partial(fn, use_delta=use_delta), x, compute_dtype=torch.float64)


def check_case(case: Case, mode: str, dtype: torch.dtype, device, seed: int = 0, reference_result=None,
               verbose: bool = True, settings=None):
    """Runs one case with the kernels of `mode` (a key of KERNELS; the chunk kernels with `settings`, a
    `launch.ChunkLaunch`, if given); returns (failed tensor names, the oracle result for reuse with another mode
    of the same rule)."""
    x = make_inputs(case, dtype, device, seed)
    if reference_result is None:
        reference_result = oracle(x, use_delta=mode != "gla")
    kernel = KERNELS[mode] if settings is None else functools.partial(KERNELS[mode], settings=settings)
    with nan_poisoned_allocations():
        got = run_with_grads(kernel, x)
        with torch.no_grad():  # inference's forward keeps nothing for backward: other kernel variants (chunk.py)
            o, final_state = run_op(kernel, x, case_inputs(x))
    label = f"{mode:9s} {str(dtype)[6:]:8s} {case.name}"
    failed = compare(got, reference_result, THRESHOLDS[dtype], label, verbose)
    failed += [f"{name} (no grad)" for name in compare(
        dict(o=o, final_state=final_state), {name: reference_result[name] for name in ("o", "final_state")},
        THRESHOLDS[dtype], label + " no grad", verbose)]
    return failed, reference_result


def check_decode(B: int, H: int, K: int, V: int, dtype: torch.dtype, device, seed: int = 0,
                 verbose: bool = True) -> list:
    """triton_decode_step against the oracle for one token; the state must be updated in place."""
    x = make_inputs(Case(B=B, T=1, H=H, K=K, V=V), dtype, device, seed)
    ref_o, ref_state = reference.recurrent_gated_delta_rule(
        *(x[n].double() for n in ("q", "k", "v", "g", "beta")), scale=K ** -0.5,
        initial_state=x["initial_state"].double(), output_final_state=True)
    state = x["initial_state"].clone()
    with nan_poisoned_allocations():
        o = triton_decode_step(x["q"], x["k"], x["v"], x["g"], x["beta"], state, scale=K ** -0.5)
    label = f"decode    {str(dtype)[6:]:8s} B{B}-T1-H{H}-K{K}-V{V}"
    return compare(dict(o=o, final_state=state), dict(o=ref_o, final_state=ref_state), THRESHOLDS[dtype],
                   label, verbose)


def full_matrix() -> list:
    """The cases: T in {1, 63, 64, 65, 300, 1000, 4096}, small and large B*H, K/V 16..256
    (K != V too), varlen with uneven lengths incl. length 1, initial state on/off, every gate regime."""
    cases = [Case(B=2, T=T, H=2, K=64, V=64, initial_state=T % 2 == 1) for T in (1, 63, 64, 65, 300, 1000, 4096)]
    cases += [Case(B=1, T=200, H=2, K=K, V=V) for K, V in
              ((16, 16), (32, 128), (128, 128), (256, 256), (256, 64))]
    cases += [Case(B=2, T=300, H=2, K=64, V=64, gate=gate) for gate in ("none", "forget")]
    cases += [Case(B=8, T=1000, H=16, K=128, V=128, initial_state=False),
              Case(B=4, T=4096, H=16, K=128, V=128, gate="none"),
              Case(B=3, T=300, H=16, K=128, V=128),  # 48 states: the backward state pass in blocks of 32
              Case(B=2, T=1000, H=2, K=64, V=64, grad_scale=1e-6)]  # a real loss's gradient size
    cases += [varlen_case((1, 63, 64, 65, 300, 1, 130, 7), H=4, K=64, V=64),
              varlen_case((1, 63, 64, 65, 300, 1, 130, 7), H=4, K=64, V=64, initial_state=False, gate="forget"),
              varlen_case((1000, 1, 37, 2000, 129), H=2, K=128, V=64)]
    return cases


def quick_matrix() -> list:
    return [Case(B=1, T=65, H=2, K=32, V=64), varlen_case((1, 63, 65, 3), H=2, K=64, V=32, initial_state=False)]


def environment_line(device) -> str:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    return (f"card: {card} | date: {datetime.date.today().isoformat()} | torch {torch.__version__} | "
            f"triton {triton.__version__}")


def check_item(item) -> tuple:
    """One row of the table: item = (mode, dtype, case, device) with mode in KERNELS or "decode" (case None).
    Returns (mode, dtype name, case name, failed tensor names, seconds); runs in a worker process."""
    mode, dtype, case, device = item
    start = time.time()
    name = "B64-T1-H16-K128-V128" if mode == "decode" else case.name
    try:
        if mode == "decode":
            failed = check_decode(64, 16, 128, 128, dtype, device, verbose=False)
        else:
            failed, _ = check_case(case, mode, dtype, device, verbose=False)
        if device.type == "cuda":
            torch.cuda.synchronize()  # a kernel's asynchronous error belongs to this case
            torch.cuda.empty_cache()  # workers share the GPU: keep each one's cached memory small
    except Exception as e:  # e.g. an illegal memory access from a miscompiled kernel: a failed case, not a stop
        failed = [f"raised {type(e).__name__}: {str(e).splitlines()[0][:100]}"]
    row = (mode, str(dtype)[6:], name, failed, time.time() - start)
    print(f"  {row[0]:9s} {row[1]:8s} {row[2]:44s} {'FAIL' if failed else 'pass'}  {row[4]:5.1f} s", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run the short cases only")
    parser.add_argument("--jobs", type=int, default=3,
                        help="worker processes sharing the GPU (Triton compilation dominates; default 3)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default), or cpu with TRITON_INTERPRET=1 and --quick for a smoke test")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1; got {args.jobs}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: the check runs the compiled kernels on a GPU")
    cases = quick_matrix() if args.quick else full_matrix()
    # the interpreter computes bfloat16 wrongly, so on CPU only float32 is checked
    dtypes = (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)
    items = [(mode, dtype, case, device) for dtype in dtypes for case in cases for mode in KERNELS]
    items += [("decode", dtype, None, device) for dtype in dtypes]
    # largest first, so the long cases don't end up last on one worker
    items.sort(key=lambda item: -(item[2].B * item[2].T * item[2].H * item[2].K * item[2].V if item[2] else 0))
    start = time.time()
    # a fresh process per case: a CUDA error leaves its process's context unusable for the cases after it
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                max_tasks_per_child=1) as pool:
        rows = sorted(pool.map(check_item, items), key=lambda row: (row[1], row[2], row[0]))
    print(f"\n{environment_line(device)} | {time.time() - start:.0f} s with {args.jobs} workers")
    print("| mode | dtype | case | result |\n|---|---|---|---|")
    for mode, dtype, name, failed, _ in rows:
        print(f"| {mode} | {dtype} | {name} | {'FAIL: ' + ', '.join(failed) if failed else 'pass'} |")
    num_failed = sum(bool(row[3]) for row in rows)
    print(f"\n{len(rows) - num_failed}/{len(rows)} passed")
    return 1 if num_failed else 0


if __name__ == "__main__":
    sys.exit(main())
