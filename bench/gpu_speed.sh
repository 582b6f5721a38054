#!/usr/bin/env bash
# Issue 8's speed items in one device call each: fp8 tensor-core matmuls for Flux, partial checkpointing,
# whole-graph compile and CUDA graphs for the launch-bound SDXL step, beside the reference step.
# Usage: bash bench/gpu_speed.sh PART (set-up as bench/gpu_issue8.sh says: wheels and reference_step.py in .whl/).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
O=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ours() { echo "== ${*:2}" >> $O/ours.log; timeout "$1" python3 bench/lora_step.py "${@:2}" >> $O/ours.log 2>&1; tail -1 $O/ours.log; }
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
