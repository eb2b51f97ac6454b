"""Launch-setting sweep for the chunk kernels, each setting checked against the default one: the sequential
state passes (V block x num_warps x num_stages; how launch.ChunkLaunch.state was chosen) and the per-chunk wgmma
kernels (num_warps x num_stages; ChunkLaunch.per_chunk; for dqk_bwd also its K and V blocks, dqk_wide; for
output_fwd its V block, output_wide). Every trial passes its own ChunkLaunch to the kernel's launcher.

    python scripts/sweep_launch.py --out sweep.jsonl [--jobs 8] [--kernels state_bwd,wy_bwd]

Triton 3.6 can miscompile Hopper wgmma for some settings (wrong numbers or illegal memory accesses, see
launch.py), so every trial runs in a worker process: phase 1 compiles and checks every trial in --jobs
workers (a crashed worker is restarted without the trial it died on), phase 2 times the trials that matched
the default setting's outputs, one process, one at a time. Prints one table; writes JSON lines.
"""
import argparse
import itertools
import json
import subprocess
import sys
import time

SHAPES = {"B8T4096D128": (8, 4096, 16, 128), "B1T32768D128": (1, 32768, 16, 128), "B4T4096D256": (4, 4096, 8, 256),
          "B8T4096H8D128": (8, 4096, 8, 128)}  # the last: the model's GDN layer (d_model 1024, 8 heads)
STATE_KERNELS = ("state_fwd", "state_bwd")
CHUNK_KERNELS = ("output_fwd", "dqk_bwd", "wy_bwd")  # one program per chunk: the shape only sets the work
DQK_BLOCKS = ((64, 64), (128, 64), (128, 32), (64, 32))  # (K, V) block caps of dqk_bwd (ChunkLaunch.dqk_config)


def trials(state_warps=(4,), state_stages=(1, 2, 3)):
    out = []
    for kernel in CHUNK_KERNELS:
        for shape in ("B8T4096D128", "B4T4096D256"):
            for warps, stages, blocks, bv in itertools.product(
                    (4, 8), (1, 2, 3), DQK_BLOCKS if kernel == "dqk_bwd" else (None,),
                    (64, 128) if kernel == "output_fwd" else (0,)):
                out.append(dict(kernel=kernel, shape=shape, BV=bv, num_warps=warps, num_stages=stages,
                                blocks=blocks))
    for kernel in STATE_KERNELS:
        for shape in SHAPES:
            d256 = shape.endswith("D256")
            for warps, bv, stages in itertools.product(state_warps, (16, 32, 64), state_stages):
                if d256 and (stages >= 3 or (bv == 64 and stages > 1)):
                    continue  # K = 256: shared memory
                out.append(dict(kernel=kernel, shape=shape, BV=bv, num_warps=warps, num_stages=stages))
    return out


def trial_settings(trial):
    """The default launch settings with this trial's (V block or K/V block caps, num_warps, num_stages) for its
    kernel, whatever the shape would pick."""
    from gdn_exp.ops.gated_delta_rule.launch import DEFAULT_LAUNCH
    name = trial["kernel"]
    setting = dict(num_warps=trial["num_warps"], num_stages=trial["num_stages"])
    if name in STATE_KERNELS:
        return DEFAULT_LAUNCH.replace(state={**DEFAULT_LAUNCH.state, name: {trial["BV"]: setting}},
                                      wide_state={**DEFAULT_LAUNCH.wide_state, name: (trial["BV"], setting)},
                                      one_wave_state_bwd=None)
    if name == "dqk_bwd":
        bk, bv = trial["blocks"]
        return DEFAULT_LAUNCH.replace(dqk_wide=dict(BK=bk, BV=bv, **setting))
    if name == "output_fwd":
        return DEFAULT_LAUNCH.replace(output_wide=dict(BV=trial["BV"], **setting))
    return DEFAULT_LAUNCH.replace(per_chunk={**DEFAULT_LAUNCH.per_chunk, name: setting})


def run_trial(trial, fns, time_it):
    import torch
    from gdn_exp.dev.bench import do_bench
    from gdn_exp.ops.gated_delta_rule.launch import DEFAULT_LAUNCH
    name = trial["kernel"]
    fn = fns[trial["shape"]][name]

    def outputs(settings):  # dqk_bwd's dG parts (one per K block) compare as their sum
        out = [x.float() for x in fn(settings) if x is not None]
        return out[:-1] + [out[-1].sum(0)] if name == "dqk_bwd" else out

    ref = outputs(DEFAULT_LAUNCH)
    settings = trial_settings(trial)
    out = outputs(settings)
    torch.cuda.synchronize()
    err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(out, ref))
    nan = any(bool(a.isnan().any()) for a in out)
    res = dict(trial, err=err, nan=nan)
    if time_it:
        res["ms"] = do_bench(lambda: fn(settings))
    return res


def child(indices, time_it, all_trials):
    from gdn_exp.dev.bench import chunk_kernel_launches
    fns = {}
    for i in indices:
        t = all_trials[i]
        if t["shape"] not in fns:
            fns[t["shape"]] = chunk_kernel_launches(*SHAPES[t["shape"]])
        print(json.dumps({"start": i}), flush=True)
        print(json.dumps({"done": i, **run_trial(t, fns, time_it)}), flush=True)


def run_workers(indices, jobs, time_it, all_trials, worker_args):
    """Runs the trials in `jobs` worker processes; returns {index: result}, crashed trials as errors."""
    import tempfile
    results, pending = {}, list(indices)
    while pending:
        before = len(results)
        slices = [pending[j::jobs] for j in range(min(jobs, len(pending)))]
        procs = []
        for s in slices:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            cmd = ([sys.executable, __file__, "--child", ",".join(map(str, s))] + worker_args
                   + (["--time"] if time_it else []))
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=err, text=True), out, err))
        for p, out, err in procs:
            try:
                p.wait(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            out.seek(0)
            err.seek(0)
            started = None
            for line in out.read().splitlines():
                if not line.startswith("{"):
                    continue
                rec = json.loads(line)
                if "start" in rec:
                    started = rec["start"]
                else:
                    results[rec.pop("done")] = rec
                    started = None
            if started is not None:
                results[started] = dict(all_trials[started],
                                        crash=(err.read().strip().splitlines() or ["?"])[-1][:160])
        if len(results) == before:  # the workers died before any trial: report that, do not retry forever
            err.seek(0)
            why = (err.read().strip().splitlines() or ["?"])[-1][:160]
            results.update({i: dict(all_trials[i], crash=why) for i in pending})
        pending = [i for i in pending if i not in results]
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--out", default="sweep.jsonl")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--kernels", default="", help="comma-separated kernel names; default: all")
    parser.add_argument("--state-warps", default="4", help="num_warps of the state passes, e.g. 4,8")
    parser.add_argument("--state-stages", default="1,2,3", help="num_stages of the state passes, e.g. 2,3,4")
    args = parser.parse_args()
    all_trials = trials(*(tuple(int(x) for x in arg.split(",")) for arg in (args.state_warps, args.state_stages)))
    if args.child is not None:
        child([int(i) for i in args.child.split(",") if i], args.time, all_trials)
        return
    worker_args = ["--state-warps", args.state_warps, "--state-stages", args.state_stages]
    kernels = set(filter(None, args.kernels.split(",")))
    selected = [i for i, t in enumerate(all_trials) if not kernels or t["kernel"] in kernels]
    t0 = time.time()
    checked = run_workers(selected, args.jobs, False, all_trials, worker_args)
    print(f"phase 1 (compile + check, {len(selected)} trials): {time.time() - t0:.0f} s", flush=True)
    good = [i for i, r in checked.items() if "crash" not in r and not r["nan"] and r["err"] < 1e-3]
    timed = run_workers(sorted(good), 1, True, all_trials, worker_args)
    with open(args.out, "w") as f:
        for i in selected:
            rec = timed.get(i, checked[i])
            f.write(json.dumps(rec) + "\n")
            ms = f"{rec['ms']:.3f}" if "ms" in rec else "-"
            status = rec.get("crash") or (f"err {rec['err']:.1e}" + (" NaN" if rec["nan"] else ""))
            blocks = f" blocks {rec['blocks']}" if rec.get("blocks") else ""
            print(f"{rec['kernel']:16s} {rec['shape']:13s} BV{rec['BV']:<3d} {rec['num_warps']}w {rec['num_stages']}s "
                  f"{ms:>7s} ms  {status}{blocks}", flush=True)


if __name__ == "__main__":
    main()
