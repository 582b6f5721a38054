# Sourced by bench/gpu_*.sh on the device machine. Before the device call, here: the wheels in .whl/ (diffusers,
# torchao, pydantic and its parts, av for the video archs; see the device tool notes) and `cp ../shared/bench/reference_step.py .whl/`
# (only the repo travels); carry .whl. Installs them, sets the environment, says which GPU, and defines
# `ours SECONDS ARGS...`: one bench/lora_step.py run, its log appended to $O/ours.log, its result line printed.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src || exit 1
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
O=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ours() { echo "== ${*:2}" >> $O/ours.log; timeout "$1" python3 bench/lora_step.py "${@:2}" >> $O/ours.log 2>&1; tail -1 $O/ours.log; }
