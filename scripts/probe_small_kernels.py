"""Probe: the kernels of the MQAR reference job's training step (d_model 128, one head of 128, T 256, batch 64,
vocabulary 8192), one eager step per mixer, by total kernel time (docs/perf.md, "Small jobs").

    python scripts/probe_small_kernels.py
"""
import torch
from torch.profiler import ProfilerActivity, profile

from gdn_exp.dev.throughput import Job, reference_split


def kernel_table(mixer, data, rows=40):
    job = Job(mixer, data, cuda_graph=False)
    job.run(3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        job.train_step.eager()
        torch.cuda.synchronize()
    print(f"== {mixer}: kernels of one eager step")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=rows, max_name_column_width=70))


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    data = reference_split(torch.device("cuda"))
    for mixer in ("gdn", "no_delta", "attention"):
        kernel_table(mixer, data)


if __name__ == "__main__":
    main()
