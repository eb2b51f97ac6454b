"""`gdn-bench`: speed of our gated delta rule beside flash-linear-attention (fla) and causal SDPA, on one GPU.

    gdn-bench op                       op-level table at the standard shapes (and --shape B,T,H,D ...), then decode
    gdn-bench decode [--sweep]         one decode step at B64 H16 D128: eager, from a CUDA graph, fla; --sweep
                                       tries V block x num_warps and keeps the fastest
    gdn-bench layer [--seq-lens ...]   the model's GDN layer (d1024, 32 K tokens) and its fused parts beside
                                       their PyTorch forms, and fla's layer: forward and forward+backward ms
    gdn-bench model [--seq-lens ...]   training tokens/s and MFU: our GDN model vs our SDPA Transformer and vs
                                       our model with fla's GatedDeltaNet layer (when fla.layers imports)
    gdn-bench generate                 generation tokens/s of our GDN model, eager vs CUDA-graph decode loop
    gdn-bench profile [--seq-lens T]   the GDN model's training step: CUDA kernel time table (torch.profiler)
    gdn-bench sweep                    the small jobs of a research grid (gdn_exp/dev/throughput.py): ms per step
                                       alone (eager, graphed; GPU vs host time) and steps/s of 1-16 jobs at once
    gdn-bench pack [--packs 1,2,..]    packs of M same-shape models (gdn_exp/dev/pack_bench.py): model-steps/s
                                       against M per mixer, at the reference job and Zoology's T 512 point
    gdn-bench kernels [--sweep]        time of each chunk kernel at --shape (default B8 T4096 H16 D128);
                                       --sweep also tries the wy kernels at other num_warps and keeps the fastest
    gdn-bench data [--data-tokens N]   the task=lm data path alone at the presets' batches: rows of a memory-mapped
                                       token file (page cache warm, then cold) to int64, pinned, to the GPU; also
                                       on a CPU-only machine
    gdn-bench check [--quick]          the kernels' correctness matrix (python -m gdn_exp.ops.gated_delta_rule.check);
                                       --jobs N
                                       worker processes
    gdn-bench all --out DIR            check, op, model and generate; writes DIR/bench.json and DIR/bench.md
    gdn-bench check op layer model     any several, in this order (check, kernels, op, decode, layer, model,
                                       profile, sweep, pack, data, generate), in one process; files rewritten after each
                                       table

Timings are medians of `triton.testing.do_bench` (CUDA events; a model step or a generation over 2 s of calls);
fwd is the forward without grad (inference), train_fwd the forward of a training step (inputs that need grad),
fwd_bwd both passes. Models used for the derived columns:

FLOPs, per (token, head), chunk size C = 64, key dim K, value dim V (matrix products only, masks ignored):
    forward   6 K V (state read, state write, output from state) + 2 C (3 K + 2 V) (within-chunk products)
    backward  2 x forward;  SDPA causal: forward 2 T D per (token, head), backward 2.5 x forward.
Bytes floor (the least an op must move): forward reads q, k, v, g, beta and writes o once; forward+backward
    adds reading them and do again and writing dq, dk, dv, dg, dbeta. "% floor" = floor time at the measured
    copy bandwidth / measured time. Decode: the fp32 state read and written once per step.

fla's chunk backward refuses to run on Hopper with Triton < 3.7.1 (`fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1`);
for timing only this module sets that flag to True, and says so in its output.
"""
import argparse
import datetime
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from gdn_exp.tables import markdown_table

CHUNK = 64
OP_SHAPES = [(8, 2048, 16, 128), (8, 4096, 16, 128), (2, 16384, 16, 128), (1, 32768, 16, 128), (4, 4096, 8, 256)]
DECODE_SHAPE = (64, 16, 128)  # B, H, D
MODEL_TOKENS = 32768  # tokens per training step of the model-level benches (B = MODEL_TOKENS // T)
SLOW_REP_MS = 2000  # do_bench's rep for the model step (80-170 ms: 12-25 timed steps) and generation
# (batch size, seq_len) of the data bench: the gdn_1_3b and gdn_400m runs of gdn_exp/dev/scale_check.py
DATA_BATCHES = ((8, 4096), (16, 2048))
DATA_COLUMNS = ["batch", "page_cache", "read_ms", "host_ms", "to_device_ms", "batches_per_s", "device"]


def do_bench(fn, grad_to_none=None, rep=100) -> float:
    """Median ms of fn over rep ms of calls: triton's do_bench times max(1, rep / its own estimate) calls, so a
    slow fn (a model's training step, a generation) passes a larger rep to get a median of many calls."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def measure_copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def measure_matmul_flops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b)
    return 2 * 8192**3 / (ms * 1e-3)


def gdn_flops(B, T, H, K, V, backward: bool) -> float:
    fwd = B * T * H * (6 * K * V + 2 * CHUNK * (3 * K + 2 * V))
    return fwd * (3 if backward else 1)


def gdn_bytes(B, T, H, K, V, backward: bool, elem=2) -> float:
    fwd = B * T * H * (elem * (2 * K + 2 * V) + 4 + elem)  # q, k, v, o + g (fp32) + beta
    return fwd + (B * T * H * (elem * (4 * K + 4 * V) + 2 * (4 + elem)) if backward else 0)


def sdpa_flops(B, T, H, D, backward: bool) -> float:
    fwd = 2 * B * H * T * T * D  # QK^T and PV, halved by the causal mask
    return fwd * (3.5 if backward else 1)


def op_inputs(B, T, H, D, dtype=torch.bfloat16, device="cuda", seed=0):
    """Benchmark inputs: bf16 q, k (L2-normalised), v, beta in (0, 1); g = logsigmoid(randn) in float32."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen)
    k = F.normalize(torch.randn(B, T, H, D, device=device, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, device=device, generator=gen))
    beta = torch.rand(B, T, H, device=device, generator=gen).to(dtype)
    return q, k, v, g, beta


def load_fla():
    """fla's chunk and fused-recurrent ops with the Hopper guard bypassed, or (None, reason)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as e:  # not installed, or fails to import on this stack
        return None, f"{type(e).__name__}: {e}"
    chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only: fla refuses its chunk backward on Hopper + Triton < 3.7.1
    return {"chunk": chunk_gated_delta_rule, "recurrent": fused_recurrent_gated_delta_rule}, None


def time_fwd_bwd(fn, inputs, out_grad):
    """(forward ms without grad, training forward ms, forward+backward ms, peak extra GiB of forward+backward) of
    fn(*inputs) -> o (a tensor, or a tuple of them with a tuple out_grad). The two forwards differ where an
    implementation keeps more for backward (ours keeps the chunk states)."""
    with torch.no_grad():
        fwd = do_bench(lambda: fn(*inputs))
    train_fwd = do_bench(lambda: fn(*inputs))
    leaves = [x for x in inputs if x.requires_grad]

    def step():
        torch.autograd.backward(fn(*inputs), out_grad)

    fwd_bwd = do_bench(step, grad_to_none=leaves)
    peak = None
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    for x in leaves:
        x.grad = None
    return fwd, train_fwd, fwd_bwd, peak


def bench_op_shape(B, T, H, D, fla, bandwidth, dtype=torch.bfloat16, device="cuda") -> list:
    """Rows for one shape: ours chunk, ours recurrent, fla chunk, SDPA causal."""
    from gdn_exp.ops import gated_delta_rule

    q, k, v, g, beta = (x.requires_grad_() for x in op_inputs(B, T, H, D, dtype, device))
    do = torch.randn_like(v)
    rows = []

    def add(name, fwd, train_fwd, fwd_bwd, peak, flops_fn, bytes_fn=None):
        row = {"shape": f"B{B} T{T} H{H} D{D}", "impl": name, "fwd_ms": fwd, "train_fwd_ms": train_fwd,
               "fwd_bwd_ms": fwd_bwd, "peak_gib": peak,
               "fwd_tflops": flops_fn(False) / (fwd * 1e-3) / 1e12 if fwd else None,
               "fwd_bwd_tflops": flops_fn(True) / (fwd_bwd * 1e-3) / 1e12 if fwd_bwd else None}
        if bytes_fn:
            row["fwd_floor_pct"] = 100 * bytes_fn(False) / bandwidth / (fwd * 1e-3) if fwd else None
            row["fwd_bwd_floor_pct"] = 100 * bytes_fn(True) / bandwidth / (fwd_bwd * 1e-3) if fwd_bwd else None
        rows.append(row)

    warm_up([lambda: gated_delta_rule(q, k, v, g, beta, mode=m, backend="triton")[0].backward(do)
             for m in ("chunk", "recurrent")], device)
    gdn_f = lambda bwd: gdn_flops(B, T, H, D, D, bwd)  # noqa: E731
    gdn_b = lambda bwd: gdn_bytes(B, T, H, D, D, bwd)  # noqa: E731
    for mode in ("chunk", "recurrent"):
        ours = lambda *x, mode=mode: gated_delta_rule(*x, mode=mode, backend="triton")[0]  # noqa: E731
        add(f"ours {mode}", *time_fwd_bwd(ours, (q, k, v, g, beta), do), gdn_f, gdn_b)
    if fla:
        theirs = lambda *x: fla["chunk"](*x)[0]  # noqa: E731
        try:
            add("fla chunk", *time_fwd_bwd(theirs, (q, k, v, g, beta), do), gdn_f, gdn_b)
        except Exception as e:  # report, keep going
            rows.append({"shape": f"B{B} T{T} H{H} D{D}", "impl": "fla chunk", "error": str(e)[:200]})
    qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # [B, H, T, D]
    sdpa = lambda *x: F.scaled_dot_product_attention(*x, is_causal=True)  # noqa: E731
    add("sdpa causal", *time_fwd_bwd(sdpa, (qs, ks, vs), do.transpose(1, 2).contiguous()),
        lambda bwd: sdpa_flops(B, T, H, D, bwd))
    return rows


def warm_up(fns, device, seconds: float = 1.0) -> None:
    """Runs each of fns once (Triton compiles on first use), then, on a GPU, bf16 products for `seconds`: the
    card's clocks sit low after an idle spell (compilation), and a shape timed first read 3.5x slower (4.59
    against 1.33 ms fwd+bwd at B8 T2048 on the H200, 2026-12-04)."""
    for fn in fns:
        fn()
    if torch.device(device).type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def do_bench_graph(fn) -> float:
    """Median ms of fn replayed from a CUDA graph (triton.testing.do_bench_cudagraph): the GPU time alone,
    without Python and launch overhead (and without do_bench's L2 flush between calls)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, return_mode="median")


def bench_decode(fla, bandwidth, shape=DECODE_SHAPE, sweep=False, dtype=torch.bfloat16, device="cuda") -> list:
    """Rows for one decode step (T = 1, fp32 state updated in place): ours timed eagerly (do_bench, Python and
    launch included) and replayed from a CUDA graph (do_bench_graph), and fla's fused_recurrent eagerly.
    With sweep, the graph timing tries every V block x num_warps besides recurrent.DECODE_LAUNCH; both of our
    rows use the fastest."""
    from gdn_exp.ops.gated_delta_rule import recurrent

    B, H, D = shape
    q, k, v, g, beta = op_inputs(B, 1, H, D, dtype, device)
    state = torch.randn(B, H, D, D, device=device, dtype=torch.float32)
    state_bytes = 2 * state.numel() * 4

    def step(launch):
        return recurrent.triton_decode_step(q, k, v, g, beta, state, scale=D**-0.5, launch=launch)

    configs = [dict(recurrent.DECODE_LAUNCH)] + ([dict(BV=bv, num_warps=w) for bv in (16, 32, 64, 128)
                                                  for w in (1, 2, 4, 8)] if sweep else [])
    timed = [(do_bench_graph(partial(step, config)), config) for config in configs]
    graph_ms, best = min(timed, key=lambda x: x[0])
    tried = ", ".join(f"BV{c['BV']}/{c['num_warps']}w {t * 1e3:.3g}" for t, c in timed) if sweep else None
    rows = [{"impl": "ours decode (in place)", "us": do_bench(partial(step, best)) * 1e3, "launch": str(best)},
            {"impl": "ours decode (CUDA graph)", "us": graph_ms * 1e3, "launch": str(best), "tried": tried}]
    if fla:
        def fla_step():
            return fla["recurrent"](q, k, v, g, beta, initial_state=state, output_final_state=True)

        rows += [{"impl": "fla fused_recurrent", "us": do_bench(fla_step) * 1e3},
                 {"impl": "fla fused_recurrent (CUDA graph)", "us": do_bench_graph(fla_step) * 1e3}]
    for row in rows:
        row.update(shape=f"B{B} H{H} D{D} fp32 state", state_tb_s=state_bytes / (row["us"] * 1e-6) / 1e12,
                   floor_pct=100 * state_bytes / bandwidth / (row["us"] * 1e-6))
    return rows


def bench_generate(d_model=1024, n_layers=8, num_heads=8, head_dim=128, vocab_size=32000, batch_size=64,
                   prompt_len=128, new_tokens=256, cuda_graph_options=(False, True), dtype=torch.bfloat16,
                   device="cuda") -> list:
    """Greedy generation with our GDN LanguageModel (weights converted to dtype): the time of one generate()
    call of new_tokens tokens after a prompt_len-token prompt, for each generate(cuda_graph=...) option.
    tokens_per_s counts new tokens over the whole call (prefill, graph capture and sampling included);
    decode_ms_per_token leaves the prefill out. same_tokens: the option's tokens equal the first option's."""
    from gdn_exp.model import LanguageModel, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(name="bench", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, num_heads=num_heads,
                      head_dim=head_dim)
    model = LanguageModel(cfg).to(device=device, dtype=dtype)
    prompt = torch.randint(0, vocab_size, (batch_size, prompt_len), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    with torch.no_grad():
        prefill_ms = do_bench(lambda: model(prompt, use_cache=True))
    rows, first_tokens = [], None
    labels = {False: "eager", True: "CUDA graph", None: "auto"}
    for cuda_graph in cuda_graph_options:
        tokens = model.generate(prompt, new_tokens, cuda_graph=cuda_graph)
        first_tokens = tokens if first_tokens is None else first_tokens
        ms = do_bench(lambda: model.generate(prompt, new_tokens, cuda_graph=cuda_graph), rep=SLOW_REP_MS)
        rows.append({"shape": f"B{batch_size} prompt {prompt_len} + {new_tokens} new, {n_layers}x d{d_model}",
                     "impl": f"ours gdn generate ({labels[cuda_graph]})",
                     "ms": ms, "prefill_ms": prefill_ms, "decode_ms_per_token": (ms - prefill_ms) / new_tokens,
                     "tokens_per_s": batch_size * new_tokens / (ms * 1e-3),
                     "same_tokens": torch.equal(tokens, first_tokens)})
    return rows


def chunk_kernel_launches(B, T, H, D, dtype=torch.bfloat16, device="cuda") -> dict:
    """Each chunk kernel's Python launcher at one shape, as a function of the launch settings (a
    `launch.ChunkLaunch`) over random inputs and the intermediates it reads (the names of its per_chunk and state
    tables)."""
    from gdn_exp.ops.gated_delta_rule import chunk
    from gdn_exp.ops.gated_delta_rule.launch import DEFAULT_LAUNCH
    from gdn_exp.ops.gated_delta_rule.triton_utils import sequence_layout

    q, k, v, g, beta = op_inputs(B, T, H, D, dtype, device)
    do, scale = torch.randn_like(v), D**-0.5
    layout = sequence_layout(B, T, None, chunk.CHUNK_SIZE, q.device)
    g_cum, a_inv, w, u = chunk.chunk_wy_fwd(k, v, g, beta, layout, store_a_inv=True)

    def state_fwd(settings):  # with W and U~ from the wy kernel, or applying Ainv, as the op would with `settings`
        applies = settings.applies_a_inv(B * H, D, D, dtype, q.device)
        return chunk.run_state_fwd(k, v, None if applies else w, None if applies else u, a_inv, beta, g_cum, None,
                                   False, layout, settings=settings)

    _, h, v_new, _ = state_fwd(DEFAULT_LAUNCH)
    dh, du, _ = chunk.chunk_state_bwd(q, k, w, g_cum, do, None, scale, False, layout)
    dq, dk_part, dw, dG_part = chunk.chunk_dqk_bwd(q, k, v_new, g_cum, h, do, dh, du, scale, layout)
    # wy_solve is Ainv alone, where the state pass applies it (applies_a_inv), else with its apply (W, U~);
    # inference where the state pass cannot apply it: wy_fwd. Then state_fwd and output_fwd (16-bit inference as
    # well: forward_writes_output); backward from wy_recompute (W) to wy_bwd.
    solve_only = DEFAULT_LAUNCH.applies_a_inv(B * H, D, D, dtype, q.device)
    return {
        "wy_fwd": lambda settings: chunk.chunk_wy_fwd(k, v, g, beta, layout, store_a_inv=False, settings=settings),
        "wy_solve": lambda settings: chunk.chunk_wy_fwd(k, v, g, beta, layout, store_a_inv=True,
                                                        write_w=not solve_only, write_u=not solve_only,
                                                        settings=settings),
        "state_fwd": state_fwd,
        "output_fwd": lambda settings: (chunk.chunk_output_fwd(q, k, v_new, g_cum, h, scale, layout, v.dtype,
                                                               settings),),
        "wy_recompute": lambda settings: chunk.chunk_wy_fwd(k, v, g, beta, layout, store_a_inv=False, a_inv=a_inv,
                                                            write_u=False, settings=settings),
        "state_bwd": lambda settings: chunk.chunk_state_bwd(q, k, w, g_cum, do, None, scale, False, layout,
                                                            settings),
        "dqk_bwd": lambda settings: chunk.chunk_dqk_bwd(q, k, v_new, g_cum, h, do, dh, du, scale, layout, settings),
        "wy_bwd": lambda settings: chunk.chunk_wy_bwd(k, v, g, beta, g_cum, a_inv, dw, du, dk_part, dG_part, layout,
                                                      settings),
    }


def bench_kernels(B, T, H, D, sweep=False, dtype=torch.bfloat16, device="cuda") -> list:
    """ms of each chunk kernel (through its Python launcher) at one shape (chunk_kernel_launches says which ones
    training and inference run); with sweep, the wy kernels (wy_fwd, wy_solve, wy_recompute) are also timed at
    other num_warps and the fastest is reported. wy_solve is the training forward's solve for Ainv (with the apply
    of W and U~ where the state pass does not apply Ainv itself); its setting is the solve's."""
    from gdn_exp.ops.gated_delta_rule.launch import DEFAULT_LAUNCH

    launches = chunk_kernel_launches(B, T, H, D, dtype, device)
    device = torch.device(device)
    rows = []
    for name, fn in launches.items():
        tried = None
        if name in DEFAULT_LAUNCH.state:  # settings per V block, picked by shape
            bv, config = DEFAULT_LAUNCH.state_pass_config(name, B * H, D, D, dtype, device)
            ms, setting = do_bench(partial(fn, DEFAULT_LAUNCH)), f"BV={bv}, {config}"
            if name == "state_fwd" and DEFAULT_LAUNCH.applies_a_inv(B * H, D, D, dtype, device):
                setting += ", applies Ainv"
        elif name == "dqk_bwd":  # blocks and settings by K
            ms, setting = do_bench(partial(fn, DEFAULT_LAUNCH)), str(DEFAULT_LAUNCH.dqk_config(D, D, dtype))
        elif name == "output_fwd":  # V block and settings by V
            ms, setting = do_bench(partial(fn, DEFAULT_LAUNCH)), str(DEFAULT_LAUNCH.output_config(D, dtype))
        else:
            # the wy kernel is the one on mma.sync, not wgmma, so it is safe to sweep (see launch.py)
            wy = name in ("wy_fwd", "wy_solve", "wy_recompute")
            default = DEFAULT_LAUNCH.per_chunk[name]
            configs = [default] + ([dict(num_warps=w, num_stages=1) for w in (1, 2, 4, 8)
                                    if w != default["num_warps"]] if sweep and wy else [])
            timed = [(do_bench(partial(fn, DEFAULT_LAUNCH.replace(
                per_chunk={**DEFAULT_LAUNCH.per_chunk, name: config}))), config) for config in configs]
            ms, best = min(timed, key=lambda x: x[0])
            setting = str(best)
            if sweep and wy:
                tried = ", ".join(f"{c['num_warps']} warps {t:.3g}" for t, c in timed)
        rows.append({"shape": f"B{B} T{T} H{H} D{D}", "kernel": name, "ms": ms, "launch": setting, "tried": tried})
    return rows


class FlaMixer(torch.nn.Module):
    """fla's GatedDeltaNet layer behind our mixer interface (training only: no cache, no packed sequences)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, *, cu_seqlens=None, cache=None, use_cache=False):
        return self.layer(x)[0], None


def fla_layer(cfg, layer_idx=0):
    """fla.layers.GatedDeltaNet of a ModelConfig's GDN layer size, behind our mixer interface."""
    from fla.layers import GatedDeltaNet as FlaGatedDeltaNet

    return FlaMixer(FlaGatedDeltaNet(hidden_size=cfg.d_model, expand_v=cfg.expand_v, head_dim=cfg.head_dim,
                                     num_heads=cfg.num_heads, conv_size=cfg.conv_size, layer_idx=layer_idx))


def with_fla_mixers(model):
    """Our LanguageModel with every GDN mixer replaced by fla.layers.GatedDeltaNet of the same size: the same
    model around fla's layer (its fused conv, gated norm and chunk op), so the step times compare the layers."""
    for i, block in enumerate(model.blocks):
        block.mixer = fla_layer(model.cfg, i)
    return model


def bench_layer(B=8, T=4096, d_model=1024, fla=None, dtype=torch.bfloat16, device="cuda") -> list:
    """ms of the GDN layer of `gdn-bench model` (heads of 128) and of its fused parts beside their PyTorch forms:
    the short conv + SiLU + L2 norms, the output norm + gate, the op; the whole layer (bf16 autocast; with fla,
    fla's layer of the same size too)."""
    from gdn_exp.model import ModelConfig
    from gdn_exp.nn import GatedDeltaNet
    from gdn_exp.ops import gated_delta_rule, gated_rms_norm, short_conv_silu

    H, D = max(1, d_model // 128), min(128, d_model)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen).requires_grad_()

    x, conv_w = randn(B, T, 3 * H * D), randn(3 * H * D, 4, dtype=torch.float32)
    o, gate, norm_w = randn(B, T, H, D), randn(B, T, H, D), randn(D, dtype=torch.float32)
    qkv_grads = tuple(torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
    qkv_parts = ((H, D, True), (H, D, True), (H, D, False))
    fused = [  # each beside its PyTorch form
        ("short conv + SiLU + L2 norms", lambda x, w, *, backend: short_conv_silu(x, w, qkv_parts, backend=backend)[0],
         (x, conv_w), qkv_grads),
        ("output norm + gate", lambda o, w, g, *, backend: gated_rms_norm(o, w, g, eps=1e-6, backend=backend),
         (o, norm_w, gate), qkv_grads[0])]
    parts = [(part, impl, partial(fn, backend=backend), inputs, grads) for part, fn, inputs, grads in fused
             for backend, impl in (("triton", "ours fused"), ("torch", "PyTorch"))]
    parts += [
        ("op (chunk)", "ours", lambda *x: gated_delta_rule(*x, backend="triton")[0],
         tuple(t.requires_grad_() for t in op_inputs(B, T, H, D, dtype, device)), qkv_grads[0]),
    ]
    layers = [("ours", GatedDeltaNet(d_model, H, D, backend="triton"))]
    if fla:
        layers.append(("fla layer", fla_layer(ModelConfig(d_model=d_model, num_heads=H, head_dim=D))))
    hidden = randn(B, T, d_model)
    for name, layer in layers:
        layer.to(device)

        def run(x, layer=layer):
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                return layer(x)[0]

        parts.append(("GDN layer (autocast)", name, run, (hidden,), torch.randn_like(hidden)))
    rows = []
    for part, impl, fn, inputs, out_grad in parts:
        try:
            fwd, train_fwd, fwd_bwd, peak = time_fwd_bwd(fn, inputs, out_grad)
            rows.append({"shape": f"B{B} T{T} d{d_model} H{H}", "part": part, "impl": impl, "fwd_ms": fwd,
                         "train_fwd_ms": train_fwd, "fwd_bwd_ms": fwd_bwd, "peak_gib": peak})
        except Exception as e:  # fla's layer may fail on this stack: report, keep going
            rows.append({"shape": f"B{B} T{T} d{d_model} H{H}", "part": part, "impl": impl, "error": str(e)[:200]})
    return rows


def bench_model(seq_lens=(2048, 4096, 8192, 16384), tokens_per_batch=MODEL_TOKENS, d_model=1024, n_layers=8,
                peak_flops=989e12, fla=None) -> list:
    """Training step throughput (fwd + bwd + AdamW, bf16 autocast) of equal-size GDN and Transformer models,
    and (with fla) our GDN model with fla's layer in place of ours."""
    from gdn_exp.model import LanguageModel, ModelConfig

    rows = []
    gdn = dict(mixer="gdn", num_heads=d_model // 128, head_dim=128)
    configs = {"ours gdn": gdn, "ours transformer (sdpa)": dict(mixer="attention", attention_heads=d_model // 128)}
    if fla:
        configs["fla gdn layer in our model"] = gdn
    for T in seq_lens:
        B = max(1, tokens_per_batch // T)
        for name, extra in configs.items():
            torch.manual_seed(0)
            cfg = ModelConfig(name=name, vocab_size=32000, d_model=d_model, n_layers=n_layers, **extra)
            model = LanguageModel(cfg)
            if name.startswith("fla"):
                try:
                    model = with_fla_mixers(model)
                except Exception as e:  # fla.layers fails to import on this stack
                    rows.append({"T": T, "B": B, "impl": name, "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
            ms, peak_gib = time_train_step(model, B, T)
            n = model.num_params()
            mixer = (gdn_flops(B, T, cfg.num_heads, 128, 128, True) if cfg.mixer == "gdn"
                     else sdpa_flops(B, T, cfg.num_attention_heads(), d_model // cfg.num_attention_heads(), True))
            flops = 6 * n * B * T + n_layers * mixer
            rows.append({"T": T, "B": B, "impl": name, "params_m": n / 1e6, "step_ms": ms,
                         "tokens_per_s": B * T / (ms * 1e-3), "mfu_pct": 100 * flops / (ms * 1e-3) / peak_flops,
                         "peak_gib": peak_gib})
            del model
            torch.cuda.empty_cache()
    return rows


def train_step(model, B, T):
    """A function running one training step of model (moved to CUDA) on random tokens [B, T]: bf16 autocast
    forward, the loss, backward, fused AdamW."""
    from gdn_exp.train.evaluate import lm_loss

    model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, model.cfg.vocab_size, (B, T), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(x), x)  # the trainer's loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_train_step(model, B, T) -> tuple:
    """(ms, peak GiB) of one training step (`train_step`)."""
    step = train_step(model, B, T)
    torch.cuda.reset_peak_memory_stats()
    ms = do_bench(step, rep=SLOW_REP_MS)
    return ms, torch.cuda.max_memory_allocated() / 2**30


def profile_model(T=4096, tokens_per_batch=MODEL_TOKENS, d_model=1024, n_layers=8, row_limit=25) -> str:
    """Where the GDN model's training step spends GPU time: torch.profiler's CUDA kernel table over 2 steps."""
    from torch.profiler import ProfilerActivity, profile

    from gdn_exp.model import LanguageModel, ModelConfig

    cfg = ModelConfig(name="profile", vocab_size=32000, d_model=d_model, n_layers=n_layers, num_heads=d_model // 128,
                      head_dim=128)
    step = train_step(LanguageModel(cfg), max(1, tokens_per_batch // T), T)
    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit, max_name_column_width=60)


def bench_data(num_tokens: int = 200 * 2 ** 20, batches=DATA_BATCHES, steps: int = 200, vocab_size: int = 32000,
               directory=None) -> list:
    """ms per training batch of the task=lm data path alone (`data.lm.TokenRows`, `train.data.StreamedSplit`),
    on a synthetic uint16 token file of num_tokens (random ids; 400 MiB by default) in a temporary directory.

    read_ms: the batch's random rows read from the memory map into int64 (with the batch indices);
    host_ms: the loop's whole data call (on CUDA: also into a pinned buffer and an asynchronous copy), what the
    host spends per step; to_device_ms: the same until the batch is on the device (synchronised; the GPU then
    waits for the copy only, the host not at all). page_cache warm: the file in memory (a corpus that fits
    in RAM, or a second epoch); cold: the file's pages dropped first (posix_fadvise DONTNEED; rows where the system
    allows it), so rows come from the disk (with the kernel's read-around), as on a first pass over a corpus
    larger than RAM.
    """
    import os
    import tempfile

    import numpy as np

    from gdn_exp.data.lm import TokenRows
    from gdn_exp.train.data import StreamedSplit, batch_indices

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows_out = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "tokens.bin"
        rng = np.random.default_rng(0)
        with open(path, "wb") as file:
            for start in range(0, num_tokens, 2 ** 24):
                rng.integers(0, vocab_size, min(2 ** 24, num_tokens - start), dtype=np.uint16).tofile(file)
            file.flush()
            os.fsync(file.fileno())

        def drop_page_cache() -> bool:
            """Drops the file's pages from the page cache; False where the system does not let us."""
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                return True
            except (OSError, AttributeError):  # AttributeError: no posix_fadvise (macOS)
                return False
            finally:
                os.close(fd)

        def ms_per_batch(call, page_cache):
            if page_cache == "cold":
                drop_page_cache()
            call(0)  # first use: the mapping, pinned buffers, CUDA context
            start = time.perf_counter()
            for step in range(1, steps + 1):
                call(step)
            return (time.perf_counter() - start) / steps * 1e3

        page_caches = ("warm", "cold") if drop_page_cache() else ("warm",)
        for batch_size, seq_len in batches:
            for page_cache in page_caches:
                def fresh_rows():  # a new memory map: a cold run must not find the pages already mapped
                    return TokenRows(path, "uint16", num_tokens, 0, num_tokens, seq_len)

                rows = fresh_rows()
                out = np.empty((batch_size, seq_len + 1), dtype=np.int64)
                read_ms = ms_per_batch(lambda step: rows.read(batch_indices(
                    step, seed=1, batch_size=batch_size, num_examples=len(rows)).numpy(), out=out), page_cache)
                split = StreamedSplit(fresh_rows(), seed=2, batch_size=batch_size, device=device)
                host_ms = ms_per_batch(split, page_cache)
                row = {"batch": f"{batch_size}x{seq_len}", "page_cache": page_cache, "read_ms": read_ms,
                       "host_ms": host_ms, "batches_per_s": 1e3 / host_ms, "device": str(device)}
                if device.type == "cuda":
                    split = StreamedSplit(fresh_rows(), seed=3, batch_size=batch_size, device=device)

                    def to_device(step):
                        split(step)
                        torch.cuda.synchronize()

                    row["to_device_ms"] = ms_per_batch(to_device, page_cache)
                rows_out.append(row)
    return rows_out


def markdown(rows, columns) -> str:
    def fmt(x):
        return f"{x:.3g}" if isinstance(x, float) else ("" if x is None else str(x))

    return markdown_table(columns, [[fmt(r.get(c)) for c in columns] for r in rows])


def add_ratios(rows):
    """ours/fla time ratios on each shape's 'ours chunk' row (< 1: ours faster)."""
    by_shape = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {})[r["impl"]] = r
    for impls in by_shape.values():
        ours, fla = impls.get("ours chunk"), impls.get("fla chunk")
        if ours and fla and "fwd_ms" in fla:
            ours["fla_over_ours_fwd"] = fla["fwd_ms"] / ours["fwd_ms"]
            ours["fla_over_ours_fwd_bwd"] = fla["fwd_bwd_ms"] / ours["fwd_bwd_ms"]


BENCHES = ("op", "decode", "kernels", "layer", "model", "generate", "profile", "sweep", "pack", "data", "check",
           "all")


def parse_args(argv=None):
    """(args, the set of benches to run, the check's own arguments). Options may come between the names
    (`gdn-bench check --quick op`)."""
    parser = argparse.ArgumentParser(prog="gdn-bench", description=__doc__.split("\n")[0])
    # names checked below, not by argparse `choices`: intermixed parsing checks an empty list against them
    parser.add_argument("what", nargs="*",
                        help=f"one or more of {', '.join(BENCHES)}, run in one process (default: op)")
    parser.add_argument("--shape", action="append", default=[], help="B,T,H,D (repeatable); default: the standard set")
    parser.add_argument("--sweep", action="store_true",
                        help="kernels: also try the wy kernels at other num_warps; op, decode: V block x num_warps")
    parser.add_argument("--seq-lens", default="2048,4096,8192,16384",
                        help="model: sequence lengths T (profile: the first)")
    parser.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention even if importable")
    parser.add_argument("--out", type=Path, help="directory for bench.json and bench.md")
    parser.add_argument("--packs", default="1,2,4,8,16,32", help="pack: the pack sizes M")
    parser.add_argument("--mixers", default="gdn,no_delta,no_gate,attention", help="pack: the mixers")
    parser.add_argument("--points", default="reference,zoology_t512", help="pack: the job shapes")
    parser.add_argument("--quick", action="store_true", help="check: the short cases only")
    parser.add_argument("--jobs", type=int, help="check: worker processes (the checker's default if not given)")
    parser.add_argument("--data-tokens", type=int, default=200 * 2 ** 20,
                        help="data: tokens of the synthetic uint16 token file (default 200 Mi: 400 MiB)")
    args = parser.parse_intermixed_args(argv)
    args.what = args.what or ["op"]
    unknown = [name for name in args.what if name not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    what = {"check", "op", "model", "generate"} if "all" in args.what else set(args.what)
    check_args = (["--quick"] if args.quick else []) + ([] if args.jobs is None else ["--jobs", str(args.jobs)])
    return args, what, check_args


def main(argv=None):
    args, what, check_args = parse_args(argv)
    given_shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape]
    given_seq_lens = [int(t) for t in args.seq_lens.split(",")]
    if what == {"check"}:
        from gdn_exp.ops.gated_delta_rule import check as kernel_check

        return kernel_check.main(check_args)
    if what == {"data"} and not torch.cuda.is_available():  # the data path alone also runs on a CPU-only machine
        rows = bench_data(args.data_tokens)
        print(f"data path, {torch.get_num_threads()} CPU threads, {datetime.date.today().isoformat()}:\n"
              + markdown(rows, DATA_COLUMNS))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bench.json").write_text(json.dumps({"data": rows}, indent=2))
        return 0
    if not torch.cuda.is_available():
        sys.exit("gdn-bench: needs a CUDA GPU (found none)")
    import triton

    fla, fla_reason = (None, "--no-fla") if args.no_fla else load_fla()
    env = {"card": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
           "torch": torch.__version__, "triton": triton.__version__,
           "fla": ("unavailable: " + fla_reason if fla is None
                   else "fla 0.6 (Hopper chunk-backward guard bypassed for timing)")}
    bandwidth, matmul = measure_copy_bandwidth(), measure_matmul_flops()
    env.update(copy_tb_s=bandwidth / 1e12, bf16_matmul_tflops=matmul / 1e12)
    report = {"env": env}
    text = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in env.items()]
    print("\n".join(text), flush=True)

    def emit(key, rows, columns=None):
        """Adds rows (a markdown table of columns, or one block of text) to the report and prints them; rewrites
        the files every time, so a time-boxed run keeps what it measured."""
        if columns is None:
            report[key] = rows
            text.extend(["", rows])
        else:
            report.setdefault(key, []).extend(rows)
            text.extend(["", markdown(rows, columns)])
        print(text[-1], flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bench.json").write_text(json.dumps(report, indent=2))
            (args.out / "bench.md").write_text("\n".join(text) + "\n")

    if "check" in what:
        from gdn_exp.ops.gated_delta_rule import check as kernel_check

        report["check_passed"] = kernel_check.main(check_args) == 0
    if "kernels" in what:
        for shape in given_shapes or [OP_SHAPES[1]]:
            emit("kernels", bench_kernels(*shape, sweep=args.sweep), ["shape", "kernel", "ms", "launch", "tried"])
    if "op" in what:
        columns = ["shape", "impl", "fwd_ms", "train_fwd_ms", "fwd_bwd_ms", "fla_over_ours_fwd",
                   "fla_over_ours_fwd_bwd", "fwd_tflops", "fwd_bwd_tflops", "fwd_floor_pct", "fwd_bwd_floor_pct",
                   "peak_gib", "error"]
        for shape in given_shapes or OP_SHAPES:
            rows = bench_op_shape(*shape, fla, bandwidth)
            add_ratios(rows)
            emit("op", rows, columns)
    if "op" in what or "decode" in what:
        emit("decode", bench_decode(fla, bandwidth, sweep=args.sweep),
             ["shape", "impl", "us", "state_tb_s", "floor_pct", "launch", "tried"])
    if "layer" in what:
        for T in given_seq_lens:
            emit("layer", bench_layer(B=max(1, MODEL_TOKENS // T), T=T, fla=fla),
                 ["shape", "part", "impl", "fwd_ms", "train_fwd_ms", "fwd_bwd_ms", "peak_gib", "error"])
    if "model" in what:
        for T in given_seq_lens:
            emit("model", bench_model(seq_lens=[T], fla=fla),
                 ["T", "B", "impl", "params_m", "step_ms", "tokens_per_s", "mfu_pct", "peak_gib", "error"])
    if "profile" in what:
        emit("profile", f"GDN model training step, T = {given_seq_lens[0]}, CUDA kernels over 2 steps:\n"
             + profile_model(T=given_seq_lens[0]))
    if "sweep" in what:
        from gdn_exp.dev.throughput import bench_sweep

        single, packed = bench_sweep()
        emit("sweep", single, ["mixer", "eager_ms", "step_ms", "gpu_ms", "host_ms", "kernels", "kernel_ms", "mem_gib"])
        emit("sweep_concurrent", packed, ["mixer"] + [k for k in packed[0] if k != "mixer"])
    if "pack" in what:
        from gdn_exp.dev.pack_bench import COLUMNS, POINTS, bench_pack

        unknown = [point for point in args.points.split(",") if point not in POINTS]
        if unknown:
            sys.exit(f"gdn-bench: --points {unknown[0]} is not one of {', '.join(POINTS)}")
        for point in args.points.split(","):  # one table per point
            emit("pack", bench_pack([point], args.mixers.split(","), [int(m) for m in args.packs.split(",")]),
                 COLUMNS)
    if "data" in what:
        emit("data", bench_data(args.data_tokens), DATA_COLUMNS)
    if "generate" in what:
        emit("generate", bench_generate(), ["shape", "impl", "ms", "prefill_ms", "decode_ms_per_token",
                                            "tokens_per_s", "same_tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
