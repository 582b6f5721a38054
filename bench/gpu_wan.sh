#!/usr/bin/env bash
# Issue 12's figures (kind nvidia-h200): `bash bench/gpu_wan.sh ref` runs the reference step (reference_step.py's
# wan13b_480p81_ckpt wan14b_480p81_ckpt) then ours for the 1.3B at 832x480x81; `bash bench/gpu_wan.sh ours` runs
# ours (bench/arch_step.py) for the 14B at 832x480x81 and 480x272x41 and the 1.3B at 480x272x41, each with the
# memory plan of a 24 GiB card inside that cap. Extra arguments go to every arch_step.py run. Set-up: bench/device_env.sh.
. bench/device_env.sh
run() { echo "== $*" >> $O/ours.log; timeout "$1" python3 bench/arch_step.py "${@:2}" >> $O/ours.log 2>&1; grep '^{\|out of memory\|Error' $O/ours.log | tail -1; }
if [ "$1" = ref ]; then
  timeout 330 python3 .whl/reference_step.py wan13b_480p81_ckpt wan14b_480p81_ckpt > $O/ref.log 2>&1; grep '^wan' $O/ref.log
  run 200 wan13b --steps 4 "${@:2}"
else
  run 240 wan14b --steps 3 "${@:2}"
  run 120 wan14b --video 480x272x41 --steps 4 "${@:2}"
  run 100 wan13b --video 480x272x41 --steps 4 "${@:2}"
fi
