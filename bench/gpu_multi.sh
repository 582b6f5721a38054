#!/usr/bin/env bash
# Issue 10's figures on the 2-GPU machine (device kind nvidia-h200-x2), one device call: data-parallel FLUX.1 and
# SDXL LoRA on 1 and 2 GPUs, and one FSDP2 full fine-tune step of FLUX.1 on 2 (set-up: bench/device_env.sh).
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the device notes ask.
. bench/device_env.sh
export NCCL_NVLS_ENABLE=0
dp() { echo "== $*" >> $O/dp.log; timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node "$@" >> $O/dp.log 2>&1; grep '^{' $O/dp.log | tail -1; }
case "$1" in
lora)
  dp 1 bench/dp_step.py flux
  dp 2 bench/dp_step.py flux
  dp 1 bench/dp_step.py sdxl
  dp 2 bench/dp_step.py sdxl
  ;;
full)
  dp 2 bench/dp_step.py flux --full --steps 4
  ;;
esac
