#!/usr/bin/env bash
# One GPU session's checks and timings, each step time-boxed; logs and JSON go to ${OUT:-gpu_out}:
# the kernels' full correctness matrix, then per-kernel times, the op table beside fla and SDPA and the model
# table in one process (gdn-bench kernels op model), and with E2E=1 first the quickstart end to end in both
# kernel modes. Run from the repository root on a CUDA machine; installs the carried wheels from .whl/ when
# present (the device image lacks hydra, omegaconf, wandb, datasets, fla; ../shared/tools/device-wheels.sh).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "${E2E:-0}" = 1 ]; then
  for mode in chunk recurrent; do
    timeout 150 python3 -m gdn_exp.cli model=small task=copy kernel=$mode logger=none trainer.progress=false \
      hydra.run.dir=/tmp/runs/e2e_$mode 2>&1 | grep -v Saving | tail -3
    cp /tmp/runs/e2e_$mode/results.json "$OUT/e2e_$mode.json"
  done
fi
timeout "${CHECK_S:-150}" python3 -m gdn_exp.dev.bench check ${CHECK_ARGS:---jobs 16} > "$OUT/check.txt" 2>&1
grep -E "FAIL|passed|card:" "$OUT/check.txt" | tail -20
timeout "${BENCH_S:-400}" python3 -m gdn_exp.dev.bench ${BENCH_WHAT:-kernels op model} ${BENCH_ARGS:-} --out "$OUT/bench" 2>&1 \
  | tee "$OUT/bench.txt" | tail -50
