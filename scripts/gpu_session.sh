#!/usr/bin/env bash
# One GPU session's checks and timings, each step time-boxed; logs and JSON go to ${OUT:-gpu_out}.
# Run from the repository root on a CUDA machine. Installs carried wheels from .whl/ when present
# (the device image lacks hydra, omegaconf, wandb, datasets; see ../shared/tools/device-wheels.sh).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline TRITON_INTERPRET=0
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"
for mode in chunk recurrent; do  # issue 3: end to end on the GPU, both kernel modes
  timeout 150 python3 -m gdn_exp.cli model=small task=copy kernel=$mode logger=none trainer.progress=false \
    hydra.run.dir=/tmp/runs/e2e_$mode 2>&1 | grep -v Saving | tail -3
  cp /tmp/runs/e2e_$mode/results.json "$OUT/e2e_$mode.json"
done
timeout ${BENCH_OP_S:-240} python3 -m gdn_exp.bench op --out "$OUT/op" 2>&1 | tee "$OUT/bench_op.txt" | tail -40
timeout ${BENCH_MODEL_S:-120} python3 -m gdn_exp.bench model --no-fla --out "$OUT/model" 2>&1 | tee "$OUT/bench_model.txt" | tail -14
