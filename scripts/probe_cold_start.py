"""Cold start of the MQAR reference job's Triton kernels on a GPU: the first step's compilation one kernel at a
time (as launched) against `TrainStep.compile_kernels` (all at once, in threads), each in an empty Triton cache.

    TRITON_CACHE_DIR=<empty dir> python scripts/probe_cold_start.py {sequential|ahead} [mixer]
"""
import sys
import time

import torch

from gdn_exp.dev.throughput import Job, reference_split

how, mixer = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "gdn")
data = reference_split(torch.device("cuda"))
job = Job(mixer, data)
torch.cuda.synchronize()
start = time.perf_counter()
if how == "ahead":
    launches = job.train_step.compile_kernels()
    compiled = time.perf_counter() - start
else:
    job.train_step.kernels_compiled, launches, compiled = True, 0, 0.0
job.run(1)  # the first eager step (compiles what is missing)
torch.cuda.synchronize()
print(f"{mixer} {how}: {launches} launches compiled ahead in {compiled:.1f} s; first step after "
      f"{time.perf_counter() - start:.1f} s")
