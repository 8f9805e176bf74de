#!/usr/bin/env bash
# The test command: set up .venv, then run the whole suite (tiny random models, real gRPC on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
