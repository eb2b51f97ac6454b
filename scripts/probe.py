"""One-off probe (session 4): fla's per-kernel times, and the batched-substitution wy_fwd against main's."""
import torch
from torch.profiler import ProfilerActivity, profile

from gdn_exp.bench import do_bench, load_fla, op_inputs
from gdn_exp.ops import _chunk_wyb, chunk
from gdn_exp.ops.triton_utils import sequence_layout

fla, why = load_fla()
for B, T, H, D in ((8, 4096, 16, 128), (1, 32768, 16, 128)):
    q, k, v, g, beta = op_inputs(B, T, H, D)
    for name, fn in (("fla", fla["chunk"] if fla else None), ("ours", chunk.triton_chunk_gated_delta_rule)):
        if fn is None:
            print("fla:", why)
            continue
        xs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
        do = torch.randn_like(v)

        def step():
            o = fn(*xs, scale=D**-0.5)[0]
            o.backward(do)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"== {name} B{B} T{T} H{H} D{D}: per-kernel CUDA time over 5 fwd+bwd steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))

B, T, H, D = 8, 4096, 16, 128
q, k, v, g, beta = op_inputs(B, T, H, D)
layout = sequence_layout(B, T, None, chunk.CHUNK_SIZE, q.device)
ref = chunk.chunk_wy_fwd(k, v, g, beta, layout, store_a_inv=True)
print("main wy_fwd (1 warp):", f"{do_bench(lambda: chunk.chunk_wy_fwd(k, v, g, beta, layout, False)):.3f} ms")
for warps in (1, 2, 4):
    _chunk_wyb.LAUNCH["wy_fwd"] = dict(num_warps=warps, num_stages=1)
    out = _chunk_wyb.chunk_wy_fwd(k, v, g, beta, layout, store_a_inv=True)
    errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(out, ref)]
    ms = do_bench(lambda: _chunk_wyb.chunk_wy_fwd(k, v, g, beta, layout, False))
    print(f"batched wy_fwd {warps} warps: {ms:.3f} ms; rel diff to main g_cum/a_inv/w/u: "
          + " ".join(f"{e:.1e}" for e in errs))
