#!/usr/bin/env bash
# Create .venv and install the project (idempotent). Extras: `bash scripts/setup.sh dev,default-models`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: a bare `torch` requirement on a fresh venv would pull a multi-GB CUDA build;
# on these machines torch 2.13.0 is a CPU wheel already on disk.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
