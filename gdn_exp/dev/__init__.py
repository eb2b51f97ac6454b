"""Developer tooling, not needed to run experiments: `gdn-bench` (bench.py: op, layer, model, decode and small-job
timings; throughput.py: the small jobs of a grid), compile_check.py (the chunk kernels compiled for sm_90 without a
GPU: registers, spills, shared memory) and scale_check.py (DDP/FSDP runs and their throughput)."""
