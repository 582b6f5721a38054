#!/usr/bin/env bash
# Issue 11's figures in one device call (kind nvidia-h200): the reference step (../shared/bench/reference_step.py,
# carried as .whl/reference_step.py) for FLUX.1, SD 3.5 Large and HiDream-I1, then ours (bench/arch_step.py) for
# HiDream, SD 3.5 Large and Chroma (its reference: bench/reference_chroma.py, the same step) with the memory plan of a 24 GiB card, inside that cap. Set-up: bench/device_env.sh.
. bench/device_env.sh
if [ "$1" != ours ]; then
  timeout 240 python3 .whl/reference_step.py flux_bs1_ckpt sd35l_bs1_ckpt hidream_bs1_ckpt > $O/ref.log 2>&1; grep -v Warn $O/ref.log | tail -4
  timeout 120 python3 bench/reference_chroma.py .whl/reference_step.py >> $O/ref.log 2>&1; grep '^{' $O/ref.log | tail -1
fi
for a in hidream sd3 chroma; do
  echo "== $a" >> $O/ours.log
  timeout 170 python3 bench/arch_step.py $a --cap 24 >> $O/ours.log 2>&1; grep '^{\|out of memory' $O/ours.log | tail -1
done
