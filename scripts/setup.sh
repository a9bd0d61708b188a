#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build), then deepport[dev].
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e '.[dev]'
