#!/usr/bin/env bash
# SDPA's cuDNN kernel first (train.attention_backend: native, on sm90+) against flash first (_native_flash), beside the
# reference step in the same call (kind nvidia-h200). `bash bench/gpu_attn.sh PART`; set-up: bench/device_env.sh.
. bench/device_env.sh
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
arch() { echo "== $*" >> $O/ours.log; timeout 170 python3 bench/arch_step.py "$@" >> $O/ours.log 2>&1; grep '^{\|out of memory\|Error' $O/ours.log | tail -1; }
case "$1" in
image)  # FLUX.1 and SDXL with their reference; SD 3.5 Large cuDNN against flash
  timeout 200 python3 .whl/reference_step.py flux_bs1_ckpt sdxl_bs1_ckpt > $O/ref.log 2>&1; grep '^flux\|^sdxl' $O/ref.log
  ours 130 flux --qtype float8 --fp8mm --keep 6 --cap 24 --error
  ours 100 flux --qtype float8 --fp8mm --keep 6 --cap 24 --attention _native_flash
  ours 80 sdxl --no-ckpt
  ours 80 sdxl --no-ckpt --attention _native_flash
  arch sd3 --cap 24
  ;;
moe)  # HiDream-I1 and Chroma with their reference
  timeout 200 python3 .whl/reference_step.py hidream_bs1_ckpt > $O/ref.log 2>&1; grep '^hidream' $O/ref.log
  timeout 120 python3 bench/reference_chroma.py .whl/reference_step.py >> $O/ref.log 2>&1; grep '^{' $O/ref.log | tail -1
  arch hidream --cap 24 --fp8mm --diffusers-moe
  arch chroma --cap 24 --fp8mm
  ;;
budget)  # FLUX.1: torch's activation-memory budget per compiled block instead of whole-block recompute, in the 24 GiB cap
  timeout 120 python3 .whl/reference_step.py flux_bs1_ckpt > $O/ref.log 2>&1; grep '^flux' $O/ref.log
  ours 100 flux --qtype float8 --fp8mm --keep 6 --cap 24
  ours 130 flux --qtype float8 --fp8mm --ac-budget 0.15 --cap 24
  ours 130 flux --qtype float8 --fp8mm --ac-budget 0.3 --cap 24
  ;;
chroma)  # Chroma with its reference: the plan for ai-toolkit's example (quantize: true) against the bf16 plan
  timeout 120 python3 bench/reference_chroma.py .whl/reference_step.py > $O/ref.log 2>&1; grep '^{' $O/ref.log | tail -1
  arch chroma --cap 24 --fp8mm --quantize
  arch chroma --cap 24 --fp8mm
  ;;
hidream)  # HiDream-I1 with its reference: flash first, then its MoE traced into one graph per block (flash, cuDNN)
  timeout 200 python3 .whl/reference_step.py hidream_bs1_ckpt > $O/ref.log 2>&1; grep '^hidream' $O/ref.log
  arch hidream --cap 24 --fp8mm --attention _native_flash --diffusers-moe
  arch hidream --cap 24 --fp8mm --attention _native_flash --diffusers-moe --capture-dynamic
  arch hidream --cap 24 --fp8mm --attention _native_cudnn --diffusers-moe --capture-dynamic
  arch hidream --cap 24 --fp8mm --attention _native_flash
  arch hidream --cap 24 --fp8mm --attention _native_cudnn
  ;;
esac
