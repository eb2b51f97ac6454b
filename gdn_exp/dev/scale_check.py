"""GPU scale checks through the real CLI (needs CUDA, and hydra-core, omegaconf and datasets installed):

    python -m gdn_exp.dev.scale_check ddp     # 2 GPUs: DDP at equal global batch vs 1 GPU (loss curve, speed-up)
    python -m gdn_exp.dev.scale_check 1.3b    # 1 GPU: the gdn_1_3b preset at T = 4096, FSDP + activation checkpointing

Both train on the shipped corpus (task=lm, byte tokens); the 1.3B check uses a 32000-token head so its
parameter count is the paper's. Throughput is the mean of the logged tokens/s windows after the first one
(which holds Triton compilation). Prints a markdown summary and writes <out>/scale_check_<check>.json; the
run dirs stay under <out>.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

DDP_RUN = ["task=lm", "task.seq_len=2048", "model=gdn_400m", "trainer.batch_size=16", "trainer.max_steps=60",
           "trainer.lr=1e-3", "trainer.warmup_steps=10"]
LARGE_RUN = ["task=lm", "task.seq_len=4096", "task.vocab_size=32000", "model=gdn_1_3b", "trainer.batch_size=8",
             "trainer.grad_accum_steps=2", "trainer.max_steps=30", "trainer.lr=3e-4", "trainer.warmup_steps=10",
             "trainer.strategy=fsdp", "trainer.activation_checkpointing=true"]
COMMON = ["logger=none", "trainer.device=cuda", "trainer.log_interval=10", "trainer.eval_interval=1000000",
          "trainer.checkpoint_interval=1000000", "trainer.target_accuracy=null", "trainer.progress=false",
          "task.num_test=16", "trainer.eval_batch_size=4"]


def run_cli(run_dir: Path, nproc: int, overrides: list) -> dict:
    """Runs gdn-exp (under torchrun when nproc > 1); returns results.json plus the train/loss and steady-state
    tokens/s from metrics.jsonl."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                   if nproc > 1 else [])
    command = launcher + ["-m", "gdn_exp.cli", *COMMON, *overrides, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "4"})
    results = json.loads((run_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]
    return {**results, "command_s": time.time() - start,
            "losses": {r["step"]: r["train/loss"] for r in rows if "train/loss" in r},
            "steady_tokens_per_s": sum(windows) / max(len(windows), 1)}


def ddp_check(out: Path) -> dict:
    if torch.cuda.device_count() < 2:
        raise SystemExit("the ddp check needs 2 GPUs")
    # the same micro-batch per GPU: 1 GPU accumulates 2 micro-batches of 8, 2 GPUs take one each
    one = run_cli(out / "ddp_1gpu", 1, DDP_RUN + ["trainer.grad_accum_steps=2"])
    two = run_cli(out / "ddp_2gpu", 2, DDP_RUN + ["trainer.grad_accum_steps=1"])
    gaps = [abs(two["losses"][s] - one["losses"][s]) / one["losses"][s] for s in one["losses"]]
    summary = {"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
               "tokens_per_s_1gpu": one["steady_tokens_per_s"], "tokens_per_s_2gpu": two["steady_tokens_per_s"],
               "speedup": two["steady_tokens_per_s"] / one["steady_tokens_per_s"],
               "max_relative_loss_gap": max(gaps), "final_loss_1gpu": one["train/loss"],
               "final_loss_2gpu": two["train/loss"], "losses_1gpu": one["losses"], "losses_2gpu": two["losses"]}
    print(f"| card | 1 GPU tok/s | 2 GPU tok/s | speed-up | max loss gap |\n|---|---|---|---|---|\n"
          f"| {summary['card']} | {summary['tokens_per_s_1gpu']:,.0f} | {summary['tokens_per_s_2gpu']:,.0f} | "
          f"{summary['speedup']:.2f}x | {summary['max_relative_loss_gap']:.2%} |")
    return summary


def large_check(out: Path) -> dict:
    result = run_cli(out / "gdn_1_3b", 1, LARGE_RUN)
    summary = {"card": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"),
               "num_params": result["num_params"], "tokens_per_s": result["steady_tokens_per_s"],
               "peak_memory_gib": result["mem/peak_gib"], "status": result["status"],
               "losses": result["losses"]}
    print(f"| card | params | T | tok/s | peak GiB |\n|---|---|---|---|---|\n| {summary['card']} | "
          f"{summary['num_params'] / 1e9:.2f}B | 4096 | {summary['tokens_per_s']:,.0f} | "
          f"{summary['peak_memory_gib']:.1f} |")
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["ddp", "1.3b"])
    parser.add_argument("--out", type=Path, default=Path("outputs/scale_check"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("scale_check needs CUDA")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = ddp_check(args.out) if args.check == "ddp" else large_check(args.out)
    (args.out / f"scale_check_{args.check}.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
