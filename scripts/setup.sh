#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build), then deepport[dev].
# The CPU build is named explicitly (+cpu, from PyTorch's CPU index), so this holds whatever pip's config says.
# DEEPPORT_TORCH_INDEX overrides that index (e.g. a mirror).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
case "$(uname -s)" in
  Darwin) TORCH="torch==2.13.0" ;;  # macOS wheels on PyPI are CPU builds (no +cpu tag there)
  *) TORCH="torch==2.13.0+cpu" ;;
esac
if ! python -c "import torch" 2>/dev/null; then
  # first where pip's config already offers the CPU build (a wheel directory, a mirror); PyPI has no +cpu builds,
  # so elsewhere that fails at once and PyTorch's CPU index is added
  pip install -q "$TORCH" 2>/dev/null \
    || pip install -q "$TORCH" --extra-index-url "${DEEPPORT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
pip install -q -e '.[dev]'
