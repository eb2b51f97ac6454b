"""Probe: the kernels of the MQAR reference job's training step (d_model 128, one head of 128, T 256, batch 64,
vocabulary 8192), one eager step per mixer, by total kernel time (docs/perf.md, "Small jobs"). A larger batch
shows which kernels grow with the work (scripts/probe_packing.py).

    python scripts/probe_small_kernels.py [batch [mixer ...]]      # default: 64 gdn no_delta attention
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from gdn_exp.dev.throughput import REFERENCE, Job, reference_split


def kernel_table(mixer, data, batch, rows=40):
    job = Job(mixer, data, cuda_graph=False, ref=dict(REFERENCE, batch_size=batch))
    job.run(3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        job.train_step.eager()
        torch.cuda.synchronize()
    print(f"== {mixer}, batch {batch}: kernels of one eager step")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=rows, max_name_column_width=70))


def main(batch, mixers):
    print(torch.cuda.get_device_name(), torch.__version__)
    data = reference_split(torch.device("cuda"), num_examples=max(8192, batch))
    for mixer in mixers:
        kernel_table(mixer, data, batch)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64, sys.argv[2:] or ("gdn", "no_delta", "attention"))
