#!/usr/bin/env bash
# One GPU call of the reproductions (docs/results/): the sweeps named by PART, each stopped by SIGTERM at its time
# limit (the sweep checkpoints and records what it reached); run dirs without checkpoints come back as one tarball.
# Run from the repository root with the wheels of ../shared/tools/device-wheels.sh in .whl/.
#   PART=mqar_t512 OUT=/tmp/out bash scripts/gpu_repro.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARN | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$OUT/device.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/device.txt"
sweep() {  # sweep NAME SECONDS OVERRIDES...: one sweep into /tmp/repro/NAME, stopped after SECONDS
  local name=$1 seconds=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S)): $*" | tee -a "$OUT/log.txt"
  local begin=$(date +%s)
  timeout -s TERM "$seconds" python3 -m gdn_exp.cli -m logger=none "hydra.sweep.dir=/tmp/repro/$name" "$@" \
    > "/tmp/repro_$name.log" 2>&1
  echo "rc $? after $(( $(date +%s) - begin )) s" | tee -a "$OUT/log.txt"
  tail -5 "/tmp/repro_$name.log" | tee -a "$OUT/log.txt"
}
case "${PART:-mqar_t512}" in
  parity)  # Grazzi et al.'s parity: beta in [0, 1] vs [0, 2] x decay gate x 3 seeds
    sweep parity ${PARITY_S:-230} +experiment=parity_negeig hydra.launcher.jobs_per_gpu=12
    ;;&
  parity|attention_t512)  # attention at the DeltaNet paper's MQAR point (T 512, 64 pairs, d 128) for longer, side by
    # side: ours (mqar_grid) and Zoology's form and training (mqar_zoology_attention) at two of Zoology's rates
    sweep attention_t512 ${ATTN_S:-170} +experiment=mqar_grid mqar_length=len512 ablation=attention \
      model.d_model=128 seed=0 trainer.lr=1e-3 trainer.max_steps=16000 trainer.checkpoint_interval=2000 &
    sweep zoology_attention_t512 ${ATTN_S:-170} +experiment=mqar_zoology_attention mqar_length=len512 \
      hydra.launcher.jobs_per_gpu=2 model.d_model=128 seed=0 trainer.lr=4.6e-4,2.2e-3 trainer.max_steps=16000 \
      trainer.checkpoint_interval=2000 &
    wait
    ;;
  mqar)  # every MQAR sweep of docs/results/mqar_reproductions.md at once (34 processes on one GPU), each job stopped
    # at its own step cap or at the call's time limit, whichever comes first
    S=${MQAR_S:-420}
    # the DeltaNet paper's point (Zoology's T 512, 64 pairs) for the recurrent mixers, 3 seeds
    sweep t512 $S +experiment=mqar_grid mqar_length=len512 hydra.launcher.jobs_per_gpu=18 \
      ablation=none,no_gate,no_delta model.d_model=64,128 seed=0,1,2 trainer.lr=1e-3 trainer.max_steps=3000 &
    # GLA's per-channel gate (PyTorch form) at the same point
    sweep t512_gla $S +experiment=mqar_grid mqar_length=len512 hydra.launcher.jobs_per_gpu=2 \
      ablation=gla model.d_model=64,128 seed=0 trainer.lr=1e-3 trainer.max_steps=3000 &
    # attention, one difference at a time: our block or Zoology's, at two rates, with our training
    sweep t512_attention_forms $S +experiment=mqar_grid mqar_length=len512 hydra.launcher.jobs_per_gpu=4 \
      ablation=attention,zoology_attention model.d_model=128 seed=0 trainer.lr=4.6e-4,1e-3 trainer.max_steps=7000 &
    # Zoology's attention as Zoology trains it: two more seeds at T 512, and its Figure 2 lengths and widths
    sweep t512_zoology_seeds $S +experiment=mqar_zoology_attention mqar_length=len512 hydra.launcher.jobs_per_gpu=2 \
      model.d_model=128 seed=1,2 trainer.lr=4.6e-4 trainer.max_steps=8000 &
    sweep zoology_fig2 $S +experiment=mqar_zoology_attention hydra.launcher.jobs_per_gpu=8 \
      mqar_length=len64,len128,len256,len512 model.d_model=64,128 seed=0 trainer.lr=4.6e-4 trainer.max_steps=3000 &
    wait
    ;;
  mqar_short)  # what 200 s of one GPU allows: the DeltaNet paper's point for the recurrent mixers (2 seeds, 2,500
    # steps), and attention at the same point with each block under our training at Zoology's rate 4.6e-4
    S=${MQAR_S:-200}
    sweep t512 $S +experiment=mqar_grid mqar_length=len512 hydra.launcher.jobs_per_gpu=12 \
      ablation=none,no_gate,no_delta model.d_model=64,128 seed=0,1 trainer.lr=1e-3 trainer.max_steps=2500 &
    sweep t512_attention_forms $S +experiment=mqar_grid mqar_length=len512 hydra.launcher.jobs_per_gpu=2 \
      ablation=attention,zoology_attention model.d_model=128 seed=0 trainer.lr=4.6e-4 trainer.max_steps=7000 &
    wait
    ;;
  *) echo "unknown PART=$PART"; exit 2;;
esac
date -u | tee -a "$OUT/log.txt"
cd /tmp/repro && tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=wandb --exclude='*.pt' . && ls -la "$OUT"
