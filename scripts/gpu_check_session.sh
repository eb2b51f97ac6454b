#!/usr/bin/env bash
# One GPU call's checks after a change that moves code (run from the repository root; ../shared/tools/device-wheels.sh
# --with-fla fills .whl/): PART=1 the GPU tests, the fla export check and the quickstart; PART=2 the LM data path
# and a gdn_400m run on it; PART=3 the small jobs' cold start, k jobs in k processes (with MPS where there is
# one) and `gdn-bench sweep`. Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, numpy; print(torch.__version__, triton.__version__, numpy.__version__)"
date -u
if [ "${PART:-1}" = 1 ]; then
  echo "== cold start, by part"
  for how in sequential ahead; do
    TRITON_CACHE_DIR=/tmp/triton_parts_$how timeout 120 python3 scripts/probe_cold_start.py $how 2>&1 | tail -1
  done | tee "$OUT/cold_start_parts.txt"
  echo "== pytest -m gpu"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops tests/test_model.py tests/test_train.py 2>&1 \
    | tail -8 | tee "$OUT/pytest_gpu.txt"
  echo "== export to fla"
  timeout 200 python3 scripts/check_export_gpu.py 2>&1 | grep -v Loading | tee "$OUT/export.txt" | tail -30
  echo "== quickstart"
  timeout 90 python3 -m gdn_exp.cli model=small task=copy logger=none trainer.progress=false \
    hydra.run.dir=/tmp/runs/e2e 2>&1 | tail -2
elif [ "$PART" = 3 ]; then
  echo "== cold start: the reference job's kernels, one at a time vs all at once (each in an empty Triton cache)"
  for how in sequential ahead; do
    TRITON_CACHE_DIR=/tmp/triton_$how timeout 120 python3 scripts/probe_cold_start.py $how 2>&1 | tail -1
  done | tee "$OUT/cold_start.txt"
  echo "== cold start of the CLI: a fresh process, empty Triton and task caches, to the first step"
  python3 -m compileall -q /tmp/site > /dev/null  # as `pip install` leaves them: the wheels' .pyc written
  export TRITON_CACHE_DIR=/tmp/triton_cli
  begin=$(date +%s.%N)
  timeout 200 python3 -m gdn_exp.cli +experiment=mqar_grid model.d_model=128 trainer.max_steps=300 \
    trainer.target_accuracy=null logger=none trainer.progress=false task_cache_dir=/tmp/cache_cli \
    hydra.run.dir=/tmp/runs/cold 2>&1 | tail -2
  python3 - "$begin" <<'PY' | tee -a "$OUT/cold_start.txt"
import json, os, sys, time
path = "/tmp/runs/cold/results.json"  # written at the end: its mtime - wall_time_s is when train() began
r, begin = json.load(open(path)), float(sys.argv[1])
first_step = os.path.getmtime(path) - r["wall_time_s"] + r["first_step_s"]
print(f"process start to the first step's end: {first_step - begin:.1f} s (of which train() to it "
      f"{r['first_step_s']:.1f} s); process start to exit: {time.time() - begin:.1f} s")
PY
  echo "== k jobs in k processes (the launcher's way): time-sliced, then under the CUDA MPS daemon if there is one"
  timeout 150 python3 scripts/probe_processes.py gdn 1 4 8 2>&1 | grep steps/s | tee "$OUT/processes.txt"
  if command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    if nvidia-cuda-mps-control -d; then
      echo "MPS:" | tee -a "$OUT/processes.txt"
      timeout 150 python3 scripts/probe_processes.py gdn 1 4 8 2>&1 | grep steps/s | tee -a "$OUT/processes.txt"
      echo quit | nvidia-cuda-mps-control
    fi
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
  echo "== gdn-bench sweep"
  timeout 330 python3 -m gdn_exp.dev.bench sweep --no-fla --out "$OUT/sweep" 2>&1 | tail -14
else
  echo "== data path"
  timeout 60 python3 -m gdn_exp.dev.bench data --no-fla --out "$OUT/data" 2>&1 | tail -12
  echo "== gdn_400m on the memory-mapped path"
  timeout 60 python3 -m gdn_exp.data.make_corpus --documents 1000000 --out /tmp/stories.txt 2>&1 | tail -2
  timeout 200 python3 -m gdn_exp.cli model=gdn_400m task=lm task.path=/tmp/stories.txt task.seq_len=2048 \
    task.num_test=16 trainer.batch_size=16 trainer.grad_accum_steps=2 trainer.max_steps=50 trainer.lr=1e-3 \
    trainer.warmup_steps=10 trainer.log_interval=10 trainer.eval_interval=1000000 trainer.checkpoint_interval=1000000 \
    trainer.eval_batch_size=4 trainer.target_accuracy=null logger=none trainer.progress=false \
    task_cache_dir=/tmp/cache hydra.run.dir=/tmp/runs/lm400m 2>&1 | grep -v Generating | tail -12
  cp /tmp/runs/lm400m/results.json /tmp/runs/lm400m/metrics.jsonl "$OUT/" 2>/dev/null
  python3 - <<'PY'
import json, os
rows = [json.loads(line) for line in open("/tmp/runs/lm400m/metrics.jsonl")]
tps = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]  # the first window compiles
step_ms = 16 * 2048 / (sum(tps) / len(tps)) * 1e3
print(f"gdn_400m step {step_ms:.1f} ms")
for r in json.load(open(os.environ["OUT"] + "/data/bench.json"))["data"]:
    if r["batch"] == "16x2048":
        print(r["page_cache"], f"host {r['host_ms']:.3f} ms = {100 * r['host_ms'] / step_ms:.4f} %, to device "
              f"{r['to_device_ms']:.3f} ms = {100 * r['to_device_ms'] / step_ms:.4f} %")
PY
fi
date -u
