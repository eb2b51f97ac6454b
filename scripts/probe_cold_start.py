"""Cold start of the MQAR reference job's Triton kernels on a GPU: the first step's compilation one kernel at a
time (as launched) against `TrainStep.compile_kernels` (all at once, in threads), each in an empty Triton cache.

    TRITON_CACHE_DIR=<empty dir> python scripts/probe_cold_start.py {sequential|ahead} [mixer]
"""
import sys
import time

import torch

from gdn_exp.dev.throughput import Job, reference_split
from gdn_exp.ops.backend import compiled_kernels

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
cached = len(compiled_kernels())
step = job.train_step
step.indices.copy_(job.indices(0))
begin = time.perf_counter()
loss_sum, _ = step.forward_backward()  # the first step's parts, each waited for
torch.cuda.synchronize()
parts = {"forward_backward": time.perf_counter() - begin}
begin = time.perf_counter()
torch.nn.utils.clip_grad_norm_(job.model.parameters(), 1.0)
job.optimizer.step()
torch.cuda.synchronize()
parts["clip_and_adamw"] = time.perf_counter() - begin
job.optimizer.zero_grad(set_to_none=True)
begin = time.perf_counter()
job.run(3)  # the loop's first steps: two eager on a side stream, then the capture
torch.cuda.synchronize()
parts["warm_up_and_capture"] = time.perf_counter() - begin
print(f"{mixer} {how}: {launches} launches compiled ahead in {compiled:.1f} s; then "
      + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
      + f"; Triton kernels compiled during the steps: {len(compiled_kernels()) - cached}; "
      f"total {time.perf_counter() - start:.1f} s")
