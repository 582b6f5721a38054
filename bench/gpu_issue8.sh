#!/usr/bin/env bash
# Issue 8 figures in one device call: the reference step and ours (quantized, capped at 24 GiB, block swap),
# output errors of each storage, host RAM while loading a full-size file. Usage: bash bench/gpu_issue8.sh PART
# (set-up: bench/device_env.sh).
. bench/device_env.sh
case "$1" in
1)
  timeout 150 python3 .whl/reference_step.py flux_bs1_ckpt 2>&1 | tail -2 | tee $O/ref.log
  ours 150 flux --qtype float8 --cap 24
  ours 60 flux --qtype float8 --eager --error
  ours 60 flux --qtype int8 --eager --error
  ours 70 flux --qtype nf4 --eager --error
  ours 150 flux
  ours 150 flux --qtype float8 --swap 16 --cap 24
  ;;
2)
  ours 150 flux --qtype float8 --swap 16 --cap 24
  timeout 100 python3 bench/load_ram.py write /tmp/flux1-random.safetensors && ls -la /tmp/flux1-random.safetensors
  timeout 100 python3 bench/load_ram.py load /tmp/flux1-random.safetensors float8 cuda 2>&1 | tail -1 | tee -a $O/ram.log
  rm -f /tmp/flux1-random.safetensors
  timeout 200 python3 bench/hidream_step.py .whl/reference_step.py 24 24 2>&1 | tail -3 | tee -a $O/hidream.log
  ;;
4)
  timeout 100 python3 .whl/reference_step.py sdxl_bs1_ckpt 2>&1 | tail -2 | tee -a $O/ref.log
  ours 120 sdxl
  ;;
3)
  timeout 200 python3 bench/load_ram.py write /tmp/flux1-random.safetensors && ls -la /tmp/flux1-random.safetensors
  timeout 150 python3 bench/load_ram.py load /tmp/flux1-random.safetensors float8 cuda 2>&1 | tail -1 | tee -a $O/ram.log
  ;;
esac
