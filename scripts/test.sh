#!/usr/bin/env bash
# The project's test command (README): the fast suite, then the slow tier in its own step.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
python -m pytest -q -x "$@"
