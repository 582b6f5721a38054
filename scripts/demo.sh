#!/usr/bin/env bash
# Set up (if needed) and run the embedded smoke demo: a tiny random Flux-architecture model, trained on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c "import eridiffusion, torch" 2>/dev/null || bash scripts/setup.sh
. .venv/bin/activate
python -m eridiffusion.demo "$@"
