"""Compiles the chunk kernels, with and without the delta rule (and the layer's fused short conv, the norms, the
MLP's SwiGLU and the loss) for Hopper (sm_90) without a GPU and reports each kernel's registers, stack (spills) and
shared memory: catches compile errors and shared-memory or register blow-ups before GPU time.

    python -m gdn_exp.dev.compile_check [--dtype bfloat16] [--shape B,T,H,K,V] [--launch wy_fwd=1,1 ...]

The chunk op's forward and backward run on CPU tensors with every Triton launch intercepted: instead of
running, each kernel is compiled by `triton.compile` for a CUDA sm_90 target with the launch's argument types,
constexprs, divisibility hints and num_warps/num_stages, as the launcher would. Needs TRITON_INTERPRET unset
(the interpreter does not compile). Exits 1 if a kernel fails to compile or needs more shared memory than an
H100 has.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

HOPPER_SHARED_BYTES = 232448  # per block, opt-in maximum on sm_90
H100_SMS = 132
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
         torch.int64: "i64"}


def launch_signature(fn, args, kwargs):
    """(signature, constexprs, attrs, options) of one launch: pointers (16-byte aligned) and ints divisible by
    16 get the divisibility hint the launcher would give them."""
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        x = values[p.name]
        if p.is_constexpr or x is None:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = x
        elif isinstance(x, torch.Tensor):
            signature[p.name] = "*" + TYPES[x.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(x, bool):
            signature[p.name] = "i1"
        elif isinstance(x, int):
            signature[p.name] = "i32"
            if x % 16 == 0 and p.name not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32"
    options = {k: values[k] for k in ("num_warps", "num_stages") if k in values}
    return signature, constexprs, attrs, options


def registers_and_stack(cubin: bytes):
    """(registers, stack bytes) per thread, read from the cubin by the cuobjdump shipped with Triton."""
    cuobjdump = os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m[1]), int(m[2])) if m else (None, None)


def compile_chunk_kernels(B, T, H, K, V, dtype, launch_overrides=()) -> list:
    """Compiles every kernel the chunk op (and the layer's fused short conv and output norm, the MLP's SwiGLU and
    the loss over a 32 K vocabulary) launches at this shape; returns one dict per distinct compile."""
    from gdn_exp.ops.cross_entropy.kernel import triton_cross_entropy
    from gdn_exp.ops.gated_delta_rule import chunk, chunk_gla
    from gdn_exp.ops.gated_delta_rule.launch import DEFAULT_LAUNCH
    from gdn_exp.ops.gated_delta_rule.triton_utils import sequence_layout
    from gdn_exp.ops.gated_norm.kernel import triton_add_rms_norm, triton_gated_rms_norm
    from gdn_exp.ops.short_conv.kernel import triton_short_conv_silu
    from gdn_exp.ops.swiglu.kernel import triton_swiglu

    # the state passes' V blocks as an H100 picks them
    settings = DEFAULT_LAUNCH.replace(sms=H100_SMS, per_chunk={**DEFAULT_LAUNCH.per_chunk, **{
        name: dict(num_warps=warps, num_stages=stages) for name, (warps, stages) in launch_overrides}})
    results, seen = [], set()

    def compile_instead(fn, *args, grid, warmup, **kwargs):
        signature, constexprs, attrs, options = launch_signature(fn, args, kwargs)
        key = (fn.__name__, repr(sorted(constexprs.items(), key=str)), repr(signature), repr(options))
        if key in seen:
            return
        seen.add(key)
        start = time.time()
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options=options)
        regs, stack = registers_and_stack(kernel.asm["cubin"])
        results.append({"kernel": fn.__name__, "launch": options, "regs": regs, "stack": stack,
                        "shared": kernel.metadata.shared, "wgmma": "wgmma" in kernel.asm["ptx"],
                        "seconds": time.time() - start})

    run = JITFunction.run
    JITFunction.run = compile_instead  # each launch compiles for sm_90 instead of running
    try:
        q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
        v, do = torch.randn(B, T, H, V, dtype=dtype), torch.randn(B, T, H, V, dtype=dtype)
        g, beta = torch.randn(B, T, H), torch.rand(B, T, H, dtype=dtype)
        h0 = torch.zeros(B, H, K, V)
        layout = sequence_layout(B, T, None, chunk.CHUNK_SIZE, torch.device("cpu"))
        _, _, a_inv, h, v_new = chunk.chunk_gated_delta_rule_fwd(q, k, v, g, beta, K**-0.5, h0, True, layout,
                                                                 for_backward=True, settings=settings)
        chunk.chunk_gated_delta_rule_bwd(q, k, v, g, beta, a_inv, h, v_new, K**-0.5, True, do, h0, layout,
                                         settings=settings)
        chunk.chunk_gated_delta_rule_fwd(q, k, v, g, beta, K**-0.5, h0, True, layout, for_backward=False,
                                         settings=settings)
        # the same without the delta rule (the no_delta ablation)
        _, _, g_cum, h, u = chunk_gla.chunk_gla_fwd_all(q, k, v, g, beta, K**-0.5, h0, True, layout,
                                                        for_backward=True, settings=settings)
        chunk_gla.chunk_gla_bwd_all(q, k, v, g, beta, g_cum, h, u, K**-0.5, True, do, h0, layout, settings=settings)
        chunk_gla.chunk_gla_fwd_all(q, k, v, g, beta, K**-0.5, h0, True, layout, for_backward=False,
                                    settings=settings)
        # the layer's fused short conv (values are garbage here: nothing runs)
        x = torch.randn(B, T, H * (2 * K + V), dtype=dtype, requires_grad=True)
        outs = triton_short_conv_silu(x, torch.randn(x.shape[-1], 4), ((H, K, True), (H, K, True), (H, V, False)))
        torch.autograd.backward(outs, [torch.zeros_like(o) for o in outs])
        o, gate = (torch.randn(B, T, H, V, dtype=dtype, requires_grad=True) for _ in range(2))
        triton_gated_rms_norm(o, torch.ones(V), gate).backward(do)
        logits = torch.randn(B * T, 32000, dtype=dtype, requires_grad=True)
        triton_cross_entropy(logits, torch.randint(0, 32000, (B * T,))).backward()
        x = torch.randn(B, T, 1024, requires_grad=True)  # the model's residual-stream norm, d_model 1024
        triton_gated_rms_norm(x, torch.ones(1024), None, out_dtype=dtype).backward(torch.zeros(B, T, 1024, dtype=dtype))
        # with the residual add: inside the model (the new residual used later) and as its final norm (not used)
        delta, dy = torch.randn(B, T, 1024, dtype=dtype, requires_grad=True), torch.zeros(B, T, 1024, dtype=dtype)
        y, s = triton_add_rms_norm(x, delta, torch.ones(1024), out_dtype=dtype)
        torch.autograd.backward((y, s), (dy, torch.zeros(B, T, 1024)))
        triton_add_rms_norm(x, delta, torch.ones(1024), out_dtype=dtype)[0].backward(dy)
        a, b = (torch.randn(B, T, 2736, dtype=dtype, requires_grad=True) for _ in range(2))  # the MLP's, d_model 1024
        triton_swiglu(a, b).backward(torch.zeros(B, T, 2736, dtype=dtype))
    finally:
        JITFunction.run = run
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shape", default="2,256,4,128,128", help="B,T,H,K,V")
    parser.add_argument("--launch", nargs="*", default=[], metavar="KERNEL=WARPS,STAGES",
                        help="override ChunkLaunch.per_chunk entries (16-bit inputs), e.g. wy_fwd=2,1")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)")
    overrides = [(item.split("=")[0], tuple(map(int, item.split("=")[1].split(",")))) for item in args.launch]
    B, T, H, K, V = map(int, args.shape.split(","))
    print(f"triton {triton.__version__}, sm_90, {args.dtype}, B{B} T{T} H{H} K{K} V{V}")
    results = compile_chunk_kernels(B, T, H, K, V, getattr(torch, args.dtype), overrides)
    for r in results:
        print(f"{r['kernel']:26s} {str(r['launch']):36s} regs {r['regs']} stack {r['stack']} shared {r['shared']} "
              f"wgmma {r['wgmma']} ({r['seconds']:.1f} s)")
    too_big = [r["kernel"] for r in results if r["shared"] > HOPPER_SHARED_BYTES]
    if too_big:
        print("needs more shared memory than an H100 has:", ", ".join(too_big))
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
