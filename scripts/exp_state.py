"""Session-4 experiment: state-pass precision variants and the output fused into the forward state pass.

PREC 0: products with the float32 state-like operand in tf32 (main). 1: that operand as two bf16 planes
(hi + lo, two bf16 dots). 2: one bf16 plane (fla's choice). FUSE_O: the forward pass also computes o.
Accuracy against a float64 recurrence over chunks from the same W, U~, K, Q, G; time by do_bench.
"""
import torch
import triton
import triton.language as tl

from gdn_exp.bench import do_bench, op_inputs
from gdn_exp.ops import chunk
from gdn_exp.ops.chunk import chunk_gates, decay_matrix
from gdn_exp.ops.triton_utils import (load_tokens, mma, sequence_layout, start_state, state_pass_program,
                                      store_state, store_tokens)


@triton.jit
def smma(a, b, PREC: tl.constexpr):
    """a (16-bit) @ b (float32)."""
    if PREC == 0:
        return tl.dot(a.to(tl.float32), b, input_precision="tf32")
    hi = b.to(a.dtype)
    acc = tl.dot(a, hi)
    if PREC == 1:
        acc = tl.dot(a, (b - hi.to(tl.float32)).to(a.dtype), acc)
    return acc


@triton.jit
def exp_state_fwd_kernel(q, k, w, u, g_cum, h, v_new, o, ht, scale, cu_seqlens, chunk_offsets,
                         H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, FUSE_O: tl.constexpr):
    DTYPE: tl.constexpr = k.dtype.element_ty
    i_v, i_n, i_h, bos, seq_len, i_t0 = state_pass_program(cu_seqlens, chunk_offsets, H)
    b_S = start_state(ht, i_n, i_h, H, K, V, i_v * BV, BK, BV, False)
    for i_c in range(tl.cdiv(seq_len, BT)):
        b_G, m_t, _, b_G_last = chunk_gates(g_cum, bos, i_h, i_c, seq_len, H, BT)
        b_w = load_tokens(w, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
        b_k = load_tokens(k, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
        b_u = load_tokens(u, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV).to(tl.float32)
        if FUSE_O:
            b_q = load_tokens(q, bos, i_h, seq_len, H, K, i_c * BT, 0, BT, BK)
            b_qs = smma(b_q, b_S, PREC)
        else:
            store_state(h, b_S, i_t0 + i_c, i_h, H, K, V, 0, i_v * BV, BK, BV)
        b_u -= smma(b_w, b_S, PREC)
        if FUSE_O:
            b_P = mma(b_q, tl.trans(b_k), DTYPE) * decay_matrix(b_G, BT, True)
            b_o = (b_qs * tl.exp(b_G)[:, None] + mma(b_P, b_u, DTYPE)) * scale
            store_tokens(o, b_o, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        else:
            store_tokens(v_new, b_u, bos, i_h, seq_len, H, V, i_c * BT, i_v * BV, BT, BV)
        b_ud = b_u * tl.where(m_t, tl.exp(b_G_last - b_G), 0.0)[:, None]
        b_S = b_S * tl.exp(b_G_last) + smma(tl.trans(b_k), b_ud, PREC)
    store_state(ht, b_S, i_n, i_h, H, K, V, 0, i_v * BV, BK, BV)


def run(q, k, w, u, g_cum, scale, layout, BV, prec, fuse, warps, stages):
    B, T, H, K = k.shape
    V = u.shape[-1]
    N = len(layout.cu_seqlens) - 1
    h = torch.empty(layout.num_chunks, H, K, V, device=k.device, dtype=torch.float32)
    v_new, o = torch.empty_like(u), torch.empty_like(u)
    ht = torch.empty(N, H, K, V, device=k.device, dtype=torch.float32)
    exp_state_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, w, u, g_cum, h, v_new, o, ht, scale, layout.cu_seqlens, layout.chunk_offsets, H=H, K=K, V=V,
        BT=64, BK=K, BV=BV, PREC=prec, FUSE_O=fuse, num_warps=warps, num_stages=stages)
    return (o if fuse else v_new), ht


def reference(q, k, w, u, g_cum, scale):
    """float64: U = U~ - W S, O = scale (exp(G) Q S + (Q K^T * D) U), S <- exp(G_last) S + (exp(G_last - G) K)^T U."""
    B, T, H, K = k.shape
    f = lambda x: x.double().transpose(1, 2)  # noqa: E731  [B, H, T, D]
    q, k, w, u, G = f(q), f(k), f(w), f(u), g_cum.double().transpose(1, 2)
    S = torch.zeros(B, H, K, u.shape[-1], device=k.device, dtype=torch.float64)
    vn, o = torch.empty_like(u), torch.empty_like(u)
    mask = torch.ones(64, 64, device=k.device).tril().bool()
    for c in range(0, T, 64):
        sl = slice(c, c + 64)
        Gc = G[:, :, sl]
        U = u[:, :, sl] - w[:, :, sl] @ S
        D = torch.where(mask, (Gc[..., :, None] - Gc[..., None, :]).clamp(max=0).exp(), 0)
        o[:, :, sl] = scale * (Gc.exp()[..., None] * (q[:, :, sl] @ S) + ((q[:, :, sl] @ k[:, :, sl].transpose(-1, -2)) * D) @ U)
        vn[:, :, sl] = U
        Gl = Gc[..., -1:]
        S = Gl.exp()[..., None] * S + (k[:, :, sl] * (Gl - Gc).exp()[..., None]).transpose(-1, -2) @ U
    return vn.transpose(1, 2), o.transpose(1, 2), S


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def main(shapes, device="cuda", dtype=torch.bfloat16, precs=(0, 1, 2), configs=((64, 4, 1), (32, 4, 2), (16, 4, 2))):
    def bench(fn):
        return float("nan") if device == "cpu" else do_bench(fn)

    for B, T, H, D in shapes:
        for gate in ("bench", "none"):
            q, k, v, g, beta = op_inputs(B, T, H, D, dtype, device)
            if gate == "none":  # the hard case for accuracy: no decay, beta up to 2
                g = torch.zeros_like(g)
                beta = beta * 2
            scale = D**-0.5
            layout = sequence_layout(B, T, None, 64, q.device)
            g_cum, _, w, u = chunk.chunk_wy_fwd(k, v, g, beta, layout, store_a_inv=False)
            vn_ref, o_ref, S_ref = reference(q, k, w, u, g_cum, scale)
            print(f"== B{B} T{T} H{H} D{D} gates={gate}", flush=True)
            for BV, warps, stages in configs:
                for prec in precs:
                    for fuse in (False, True):
                        try:
                            out, ht = run(q, k, w, u, g_cum, scale, layout, BV, prec, fuse, warps, stages)
                            err_out = rel(out, o_ref if fuse else vn_ref)
                            err_s = rel(ht.transpose(1, 1), S_ref)
                            ms = bench(lambda: run(q, k, w, u, g_cum, scale, layout, BV, prec, fuse, warps, stages)) \
                                if gate == "bench" else float("nan")
                            print(f"BV{BV} {warps}w {stages}s prec{prec} {'fused-o' if fuse else 'state  '}: "
                                  f"{ms:.3f} ms  err {'o' if fuse else 'U'} {err_out:.1e} S {err_s:.1e}", flush=True)
                        except Exception as e:
                            print(f"BV{BV} {warps}w {stages}s prec{prec} fuse{fuse}: {type(e).__name__} {str(e)[:100]}", flush=True)
                            raise
            if gate == "bench":
                h, h_lo, v_new, _ = chunk.chunk_state_fwd(k, w, u, g_cum, None, False, layout, store_h_lo=True)
                print(f"main: state_fwd {bench(lambda: chunk.chunk_state_fwd(k, w, u, g_cum, None, False, layout, True)):.3f} ms"
                      f" + output_fwd {bench(lambda: chunk.chunk_output_fwd(q, k, v_new, g_cum, h, h_lo, scale, layout, v.dtype)):.3f} ms",
                      flush=True)


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["cpu"]:
        main([(2, 192, 2, 32)], "cpu", torch.float32, precs=(0,), configs=((16, 4, 1),))
    else:
        main([(8, 4096, 16, 128), (1, 32768, 16, 128)])
