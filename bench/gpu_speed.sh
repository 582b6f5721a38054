#!/usr/bin/env bash
# Issue 8's speed items, one device call per part: fp8 tensor-core matmuls and blocks kept out of checkpointing
# for Flux, checkpointing off for SDXL, a profile, SDPA backends, beside the reference step.
# Usage: bash bench/gpu_speed.sh PART (set-up: bench/device_env.sh).
. bench/device_env.sh
case "$1" in
sdxl)
  timeout 120 python3 .whl/reference_step.py sdxl_bs1_ckpt 2>&1 | tail -2 | tee -a $O/ref.log
  ours 100 sdxl
  ours 100 sdxl --no-ckpt
  ;;
flux)
  timeout 120 python3 .whl/reference_step.py flux_bs1_ckpt 2>&1 | tail -2 | tee -a $O/ref.log
  ours 130 flux --qtype float8 --fp8mm --cap 24 --error
  ours 110 flux --qtype float8 --fp8mm --keep 12 --cap 24
  ours 110 flux --qtype float8 --cap 24
  ours 110 flux --qtype float8 --keep 12 --cap 24
  ;;
fp8)
  timeout 200 python3 bench/lora_step.py flux --qtype float8 --fp8mm --cap 24 --profile 2>&1 | tail -40
  ;;
probe)
  timeout 60 python3 bench/sdpa_backends.py 2>&1 | grep -v Warn | tail -6
  ours 110 flux --qtype float8 --fp8mm --keep 6 --cap 24
  ours 110 flux --qtype float8 --cap 24
  ;;
cudnn)
  ours 110 flux --qtype float8 --fp8mm --keep 6 --cap 24 --cudnn
  ours 110 flux --qtype float8 --cap 24 --cudnn
  ;;
esac
