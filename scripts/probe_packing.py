"""What training M models of one shape in one set of kernels could give: the reference job's graphed step at
batch 64 * M, whose kernels do the work of M reference jobs (M models with their own weights would turn each
matmul into a batched one of the same size and each weight-gradient reduction into M smaller ones). Prints the
GPU time per step and M / that time, the steps/s that M packed jobs would reach at best.

    python scripts/probe_packing.py [mixer ...]      # default: gdn no_delta no_gate attention
"""
import sys

import torch

from gdn_exp.dev.throughput import MIXERS, REFERENCE, Job, reference_split, replay_ms

PACKS = (1, 2, 4, 8, 16, 32)


def gpu_ms(job: Job) -> float:
    job.run(60)  # compile, capture, a window of replays
    return replay_ms(job.train_step.graph, 100)


def main(mixers) -> None:
    data = reference_split(torch.device("cuda"), num_examples=64 * max(PACKS))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for mixer in mixers:
        row = []
        for m in PACKS:
            ms = gpu_ms(Job(mixer, data, ref=dict(REFERENCE, batch_size=REFERENCE["batch_size"] * m)))
            row.append(f"M={m}: {ms:.2f} ms {m / ms * 1e3:.0f}/s")
            torch.cuda.empty_cache()
        print(f"{mixer:10s} " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(MIXERS))
