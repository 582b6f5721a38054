#!/usr/bin/env bash
# Create .venv with a pinned CPU torch first (so pip never resolves a CUDA build by itself), then the package.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
