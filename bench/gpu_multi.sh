#!/usr/bin/env bash
# Issues 10 and 13, one device call per mode on a machine of several GPUs (kind nvidia-h200-x2 or -x4):
#   bash bench/gpu_multi.sh lora "1 2 4" ["flux sdxl"]   data-parallel FLUX.1 and SDXL LoRA on each GPU count
#   bash bench/gpu_multi.sh full "1 2 4"   one FSDP2 full fine-tune of FLUX.1 on each GPU count
# Each run prints one JSON line (bench/dp_step.py --profile: images/s, s/step, peak per GPU, GPU compute and NCCL
# ms per step). Set-up: bench/device_env.sh. NVLink multicast stays off, as the device notes ask.
. bench/device_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi topo -m > $O/topo.txt 2>&1; head -8 $O/topo.txt
dp() { echo "== $*" >> $O/dp.log; timeout 280 python3 -m torch.distributed.run --standalone --nproc-per-node "$@" --profile >> $O/dp.log 2>&1 \
       && grep '^{' $O/dp.log | tail -1 || echo "FAILED: $* (see dp.log)"; }
for n in $2; do
  case "$1" in
  lora) for a in ${3:-flux sdxl}; do dp $n bench/dp_step.py $a; done ;;
  full) dp $n bench/dp_step.py flux --full --steps 4 ;;
  esac
done
