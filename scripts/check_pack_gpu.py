"""GPU check of packs (gdn_exp/pack.py) in bf16, beside the marked tests (`pytest -m gpu tests/test_pack.py`: the
Triton vmap rules give each model's own loss and gradients):

For each mixer, M = 4 models of the reference job (seeds 0-3, lr 1e-3) train STEPS steps as one pack (CUDA graph,
bf16 autocast) and each alone (`dev.throughput.Job`, the solo trainer's step). Prints, per mixer, the mean of the
last 50 losses of each seed packed and alone, the largest |packed - alone| over the seeds, and the spread of the
solo runs over the seeds (their standard deviation): a pack is right when the first is well inside the second
(in bf16 the two differ by rounding, which training then amplifies like any run-to-run noise).

    python scripts/check_pack_gpu.py [mixer ...]      # default: gdn no_delta no_gate attention
"""
import statistics
import sys

import torch

from gdn_exp.dev.pack_bench import PackRun
from gdn_exp.dev.throughput import MIXERS, Job, reference_split

M, STEPS, TAIL = 4, 400, 50


def solo_losses(mixer, data, seed) -> list:
    """The solo trainer's step, as `Job.run` calls it, each step's loss read."""
    job, losses = Job(mixer, data, seed=seed), []
    for _ in range(STEPS):
        job.train_step(job.indices(job.step))
        job.scheduler.step()
        job.step += 1
        losses.append(float(job.train_step.read()[0, 0]))
    return losses


def pack_losses(mixer, data) -> list:
    """[M][STEPS] losses of the M models trained as one pack."""
    run = PackRun(mixer, data, M, base_lrs=[1e-3] * M)
    losses = []
    for _ in range(STEPS):
        run.run(1)
        losses.append(run.train_step.read()[0, :, 0].tolist())
    return [list(seed_losses) for seed_losses in zip(*losses)]  # [M][STEPS]


def main(mixers) -> int:
    data = reference_split(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; M={M}, {STEPS} steps, mean of the last {TAIL}")
    for mixer in mixers:
        packed = [statistics.mean(losses[-TAIL:]) for losses in pack_losses(mixer, data)]
        alone = [statistics.mean(solo_losses(mixer, data, seed)[-TAIL:]) for seed in range(M)]
        gap, spread = max(abs(p - a) for p, a in zip(packed, alone)), statistics.stdev(alone)
        print(f"{mixer:10s} packed {[round(x, 4) for x in packed]}  alone {[round(x, 4) for x in alone]}  "
              f"max |packed - alone| {gap:.4f}  solo spread (std over seeds) {spread:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(MIXERS)))
