"""gdn-bench's code paths on CPU: the Triton kernels under the interpreter, timed by a stand-in for do_bench
(the real numbers need a GPU); checks the rows, the derived columns and the FLOP/byte model."""
import time

import pytest
import torch

from gdn_exp.dev import bench


@pytest.fixture
def wall_clock_bench(monkeypatch):
    def timed(fn, grad_to_none=None, rep=None):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(bench, "do_bench", timed)
    monkeypatch.setattr(bench, "do_bench_graph", timed)


def test_op_rows_on_cpu(wall_clock_bench):
    rows = bench.bench_op_shape(1, 70, 2, 16, None, bandwidth=1e11, dtype=torch.float32, device="cpu")
    assert [r["impl"] for r in rows] == ["ours chunk", "ours recurrent", "sdpa causal"]
    for r in rows:
        assert r["fwd_ms"] > 0 and r["train_fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_tflops"] > 0, r
    assert rows[0]["fwd_floor_pct"] > 0


def test_decode_rows_on_cpu(wall_clock_bench):
    rows = bench.bench_decode(None, bandwidth=1e11, shape=(2, 2, 16), dtype=torch.float32, device="cpu")
    assert [r["impl"] for r in rows] == ["ours decode (in place)", "ours decode (CUDA graph)"]
    for row in rows:
        assert row["us"] > 0 and row["state_tb_s"] > 0 and row["floor_pct"] > 0
        assert row["launch"] == str(dict(BV=None, num_warps=4))


def test_decode_sweep_reports_the_fastest_launch(wall_clock_bench):
    from gdn_exp.ops.gated_delta_rule import recurrent

    default = dict(recurrent.DECODE_LAUNCH)
    rows = bench.bench_decode(None, bandwidth=1e11, shape=(2, 2, 16), sweep=True, dtype=torch.float32,
                              device="cpu")
    graph_row = rows[1]
    tried = graph_row["tried"].split(", ")
    assert len(tried) == 1 + 16
    times = {entry.split()[0]: float(entry.split()[-1]) for entry in tried}  # printed to 3 digits: ties possible
    best = eval(graph_row["launch"])  # noqa: S307 (a dict's repr, written by bench_decode)
    assert graph_row["launch"] == rows[0]["launch"]
    assert times[f"BV{best['BV']}/{best['num_warps']}w"] == min(times.values())
    assert recurrent.DECODE_LAUNCH == default  # the table itself is never changed


def test_kernel_rows_on_cpu(wall_clock_bench):
    """One row per chunk kernel launcher, each timed and labelled with its launch settings."""
    rows = bench.bench_kernels(1, 70, 2, 16, dtype=torch.float32, device="cpu")
    assert [r["kernel"] for r in rows] == ["wy_fwd", "wy_solve", "state_fwd", "output_fwd",
                                           "wy_recompute", "state_bwd", "dqk_bwd", "wy_bwd"]
    for row in rows:
        assert row["ms"] > 0 and row["launch"].count("num_warps") == 1, row


def test_every_chunk_kernel_launcher_runs_on_cpu():
    """scripts/sweep_launch.py times these launchers one by one; each must run and write all of its outputs
    (allocations start as NaN)."""
    from gdn_exp.ops.compare import nan_poisoned_allocations
    from gdn_exp.ops.gated_delta_rule.chunk import CHUNK_SIZE
    from gdn_exp.ops.gated_delta_rule.launch import DEFAULT_LAUNCH
    BS = CHUNK_SIZE // 4
    with nan_poisoned_allocations():
        launches = bench.chunk_kernel_launches(1, 70, 2, 16, dtype=torch.float32, device="cpu")
        for name, launch in launches.items():
            outputs = [x for x in launch(DEFAULT_LAUNCH) if x is not None]
            assert outputs, name
            for x in outputs:
                if x.shape[-1] == CHUNK_SIZE:  # Ainv [1, tokens, H, 64]: only its lower 16 x 16 blocks are written
                    row_block = torch.arange(x.shape[1]) % CHUNK_SIZE // BS
                    x = x.transpose(2, 3)[:, torch.arange(CHUNK_SIZE)[None, :] // BS <= row_block[:, None]]
                assert bool(x.isfinite().all()), name


def test_generate_rows_on_cpu(wall_clock_bench):
    rows = bench.bench_generate(d_model=32, n_layers=1, num_heads=2, head_dim=16, vocab_size=40, batch_size=2,
                                prompt_len=5, new_tokens=3, cuda_graph_options=(False, None), dtype=torch.float32,
                                device="cpu")
    assert [r["impl"] for r in rows] == ["ours gdn generate (eager)", "ours gdn generate (auto)"]  # auto = eager on CPU
    for row in rows:
        assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["same_tokens"], row


def test_work_model_matches_the_hand_count():
    # B8 T4096 H16 D128: 94.5 GFLOP forward and 540 MB, i.e. a 0.18 ms floor at 2.96 TB/s
    assert bench.gdn_flops(8, 4096, 16, 128, 128, backward=False) == pytest.approx(94.49e9, rel=1e-3)
    assert bench.gdn_bytes(8, 4096, 16, 128, 128, backward=False) / 2.96e12 == pytest.approx(0.1824e-3, rel=1e-3)
    assert bench.gdn_flops(1, 10, 1, 16, 16, backward=True) == 3 * bench.gdn_flops(1, 10, 1, 16, 16, backward=False)


def test_ratio_columns():
    rows = [{"shape": "s", "impl": "ours chunk", "fwd_ms": 1.0, "fwd_bwd_ms": 2.0},
            {"shape": "s", "impl": "fla chunk", "fwd_ms": 2.0, "fwd_bwd_ms": 5.0}]
    bench.add_ratios(rows)
    assert rows[0]["fla_over_ours_fwd"] == 2.0 and rows[0]["fla_over_ours_fwd_bwd"] == 2.5


def test_options_may_come_between_the_bench_names():
    """`gdn-bench check --quick op` runs the quick check and the op table (the check's options are forwarded);
    an unknown option is an error, not an argument of the check."""
    args, what, check_args = bench.parse_args(["check", "--quick", "op", "--jobs", "4", "--no-fla"])
    assert what == {"check", "op"} and args.no_fla
    assert check_args == ["--quick", "--jobs", "4"]
    assert bench.parse_args(["all"])[1] == {"check", "op", "model", "generate"}
    assert bench.parse_args([])[1:] == ({"op"}, [])
    for wrong in (["check", "--qiuck"], ["chek"]):
        with pytest.raises(SystemExit):
            bench.parse_args(wrong)


def test_layer_rows_on_cpu(wall_clock_bench):
    """Each fused part of the layer beside its PyTorch form, then the whole layer, each timed forward and
    forward+backward (the interpreter here: float32, a tiny shape)."""
    rows = bench.bench_layer(B=1, T=40, d_model=32, dtype=torch.float32, device="cpu")
    assert [(r["part"], r["impl"]) for r in rows] == [
        ("short conv + SiLU + L2 norms", "ours fused"), ("short conv + SiLU + L2 norms", "PyTorch"),
        ("output norm + gate", "ours fused"), ("output norm + gate", "PyTorch"), ("op (chunk)", "ours"),
        ("GDN layer (autocast)", "ours")]
    for r in rows:
        assert "error" not in r and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0, r


def test_pack_rows_on_cpu():
    """`gdn-bench pack`'s mechanics on a tiny shape: a row per (mixer, M), model-steps/s from the pack's step."""
    from gdn_exp.dev import pack_bench

    tiny = dict(pack_bench.REFERENCE, d_model=32, head_dim=32, vocab_size=64, seq_len=32, num_kv_pairs=4,
                batch_size=4)
    rows = pack_bench.bench_pack(["tiny"], ["gdn", "attention"], [1, 2], device="cpu", steps=1, warmup=1,
                                 refs={"tiny": tiny})
    assert [(r["mixer"], r["M"]) for r in rows] == [("gdn", 1), ("gdn", 2), ("attention", 1), ("attention", 2)]
    for row in rows:
        assert "error" not in row and row["step_ms"] > 0, row
        assert row["model_steps_per_s"] == pytest.approx(row["M"] / row["step_ms"] * 1e3)
    assert bench.parse_args(["pack", "--packs", "1,8"])[1] == {"pack"}
