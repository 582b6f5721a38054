#!/usr/bin/env bash
# Issue 12's figures (kind nvidia-h200): `bash bench/gpu_wan.sh ref [WxHxF]` runs the reference step (reference_step.py's
# wan13b_480p81_ckpt wan14b_480p81_ckpt, or bench/reference_wan.py's at another clip size); `bash bench/gpu_wan.sh "wan14b:832x480x81 wan13b:480x272x41" [ARGS]` runs
# ours (bench/arch_step.py) for those cases, each with the memory plan of a 24 GiB card inside that cap (ARGS go to
# every run). Set-up: bench/device_env.sh.
. bench/device_env.sh
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [ "$1" = ref ]; then  # `ref WxHxF` for another clip size (bench/reference_wan.py, the same step)
  if [ -n "${2:-}" ]; then
    timeout 330 python3 bench/reference_wan.py .whl/reference_step.py "$2" > $O/ref.log 2>&1; grep '^{' $O/ref.log
  else
    timeout 330 python3 .whl/reference_step.py wan13b_480p81_ckpt wan14b_480p81_ckpt > $O/ref.log 2>&1; grep '^wan' $O/ref.log
  fi
  exit
fi
for case in $1; do  # MODEL:WxHxF or MODEL:WxHxF:ARG,ARG (e.g. wan14b:832x480x81:--swap,30)
  IFS=: read -r model video more <<< "$case"
  limit=$([ $model = wan14b ] && echo 240 || echo 150)
  echo "== $case ${*:2}" >> $O/ours.log
  timeout $limit python3 bench/arch_step.py $model --video $video --steps 3 ${more//,/ } "${@:2}" >> $O/ours.log 2>&1
  grep '^{\|^memory plan\|Error' $O/ours.log | tail -2
done
