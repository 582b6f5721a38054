#!/usr/bin/env bash
# The whole LoRA step captured as one CUDA graph (`--cuda-graph`: no kernel waits on the host) against the same step
# launched from Python, beside the reference step in the same call (kind nvidia-h200). `bash bench/gpu_graph.sh PART`;
# set-up: bench/device_env.sh.
. bench/device_env.sh
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
arch() { echo "== $*" >> $O/ours.log; timeout 170 python3 bench/arch_step.py "$@" >> $O/ours.log 2>&1; grep '^{\|out of memory\|Error' $O/ours.log | tail -1; }
case "$1" in
flux_chroma)  # FLUX.1 (float8 + fp8 matmuls, 6 blocks whole) and Chroma (the plan for quantize: true); graphs first
  timeout 120 python3 .whl/reference_step.py flux_bs1_ckpt > $O/ref.log 2>&1; grep '^flux' $O/ref.log
  ours 130 flux --qtype float8 --fp8mm --keep 6 --cap 24 --cuda-graph
  timeout 100 python3 bench/reference_chroma.py .whl/reference_step.py >> $O/ref.log 2>&1; grep '^{' $O/ref.log | tail -1
  arch chroma --cap 24 --fp8mm --quantize --cuda-graph
  ours 100 flux --qtype float8 --fp8mm --keep 6 --cap 24
  arch chroma --cap 24 --fp8mm --quantize
  ;;
product)  # train.cuda_graphs through the trainer: the tiny-Flux test (graphed against eager), then FLUX.1 full size
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_graphs.py > $O/pytest.log 2>&1; tail -3 $O/pytest.log
  timeout 120 python3 .whl/reference_step.py flux_bs1_ckpt > $O/ref.log 2>&1; grep '^flux' $O/ref.log
  ours 130 flux --qtype float8 --fp8mm --keep 6 --cap 24 --cuda-graph
  ours 110 flux --qtype float8 --fp8mm --keep 12 --cap 24 --cuda-graph
  ;;
moe)  # HiDream-I1 with its experts through grouped matmuls (no host sync, one graph per block), and FLUX.1 graphed
  # with 5 blocks whole (its memory under 18 GiB)
  timeout 200 python3 .whl/reference_step.py hidream_bs1_ckpt > $O/ref.log 2>&1; grep '^hidream' $O/ref.log
  arch hidream --cap 24 --fp8mm --attention _native_cudnn
  arch hidream --cap 24 --fp8mm --attention _native_flash
  ours 100 flux --qtype float8 --fp8mm --keep 5 --cap 24 --cuda-graph
  ;;
final)  # the trainer's HiDream (grouped experts) and FLUX.1 (graphed, 5 blocks whole), each beside its reference
  timeout 200 python3 .whl/reference_step.py hidream_bs1_ckpt > $O/ref.log 2>&1; grep '^hidream' $O/ref.log
  arch hidream --cap 24 --fp8mm
  timeout 120 python3 .whl/reference_step.py flux_bs1_ckpt >> $O/ref.log 2>&1; grep '^flux' $O/ref.log
  ours 100 flux --qtype float8 --fp8mm --keep 5 --cap 24 --cuda-graph
  ;;
esac
