#!/usr/bin/env bash
# CI: build the sdist, build the wheel from it (as pip does), install the wheel into a fresh venv and run it
# from outside the checkout: --version, backends, generate, conformance quick tier on cpu_ref and on
# cuda / rocm under the Triton interpreter, new-backend + install + its conformance; then the sdist's own tests.
# The fresh venv sees the already-installed dependencies (CPU torch, triton, ...) through a .pth file and
# installs with --no-index, so nothing is downloaded and the wheel's pins are checked against them.
# Usage: bash scripts/wheel_check.sh   (from the CI venv: .venv activated)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[ -n "${VIRTUAL_ENV:-}" ] || . "$ROOT/.venv/bin/activate"  # the CI venv (its setuptools builds the wheel)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/deepport-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
PY="$(command -v python)"
export DEEPPORT_PROGRESS=0 DEEPPORT_CACHE="$WORK/cache" PIP_DISABLE_PIP_VERSION_CHECK=1
unset TRITON_INTERPRET DEEPPORT_DEVICE DEEPPORT_BACKEND PYTHONPATH
step() { echo "-- wheel check: $* ($SECONDS s)"; }

step "build sdist, then the wheel from the unpacked sdist"
(cd "$ROOT" && "$PY" -c "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))" \
  "$WORK/dist") >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
SDIST="$(ls "$WORK"/dist/deepport-*.tar.gz)"
tar -xzf "$SDIST" -C "$WORK"
SRC="$(ls -d "$WORK"/deepport-*/)"
(cd "$SRC" && "$PY" -c "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))" \
  "$WORK/dist") >>"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/deepport-*.whl)"

step "fresh venv outside the checkout; dependencies from the CI venv, deepport only from the wheel"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$WORK/deps"
for entry in "$SITE"/*; do
  case "$(basename "$entry")" in
    deepport|deepport-*|deepport_*|__editable__*|*.pth|_virtualenv*|pip|pip-*) ;;
    *) ln -s "$entry" "$WORK/deps/" ;;
  esac
done
"$PY" -m venv --without-pip "$WORK/venv"  # its own bundled setuptools would shadow the CI venv's
VPIP=("$PY" -m pip --python "$WORK/venv/bin/python")
VSITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$WORK/deps" >"$VSITE/deepport-ci-deps.pth"
"${VPIP[@]}" install -q --no-index "$WHEEL"
DP="$WORK/venv/bin/deepport"
cd "$WORK"  # outside the checkout: nothing can import the source tree

step "deepport --version, import location, shipped data"
"$DP" --version | tee "$WORK/version.txt"
"$WORK/venv/bin/python" - "$ROOT" "$VSITE" <<'EOF'
import sys
from pathlib import Path

import deepport
from deepport.cli_checks import docs_dir

root, site = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
pkg = Path(deepport.__file__).resolve().parent
assert site in pkg.parents, f"deepport imported from {pkg}, not from the wheel in {site}"
assert root not in pkg.parents, f"deepport imported from the checkout {pkg}"
for rel in ("backends/cuda/tuning.json", "backends/rocm/tuning.json", "backends/cpu_ref/conformance.toml",
            "models/tiny/fp8/model.safetensors", "docs/robustness.md", "backends/cpu/native/moe_experts.c",
            "backends/cpu/native/simd.h"):
    assert (pkg / rel).is_file(), f"the wheel lacks deepport/{rel}"
assert Path(docs_dir()) == pkg / "docs", docs_dir()
print(f"deepport {deepport.__version__} from {pkg}")
EOF
grep -q "deepport $("$WORK/venv/bin/python" -c 'import deepport; print(deepport.__version__)') " "$WORK/version.txt"

step "deepport backends"
"$DP" backends
step "cpu's C kernels: built from the wheel's sources"
"$WORK/venv/bin/python" -c '
from deepport.backends.cpu import native
assert native.available(), native.status()
print(native.status())'
step "deepport generate (embedded model)"
"$DP" generate --max-new-tokens 8
step "conformance quick tier: cpu_ref"
"$DP" conformance --backend cpu_ref --tier quick >"$WORK/cpu_ref.txt" || { cat "$WORK/cpu_ref.txt"; exit 1; }
tail -1 "$WORK/cpu_ref.txt"
step "conformance quick tier: cuda under the Triton interpreter (reads the shipped tuning.json)"
TRITON_INTERPRET=1 DEEPPORT_DEVICE=cpu "$DP" conformance --backend cuda --tier quick >"$WORK/cuda.txt" \
  || { cat "$WORK/cuda.txt"; exit 1; }
tail -1 "$WORK/cuda.txt"
step "conformance: rocm under the interpreter (kernels that read tuning.json)"
TRITON_INTERPRET=1 DEEPPORT_DEVICE=cpu "$DP" conformance --backend rocm --tier quick \
  --ops rms_norm,silu_mul,act_quant,rope >"$WORK/rocm.txt" || { cat "$WORK/rocm.txt"; exit 1; }
tail -1 "$WORK/rocm.txt"

step "new-backend, install it, its conformance"
"$DP" new-backend wheelchip --output "$WORK/wheelchip"
"${VPIP[@]}" install -q --no-index --no-build-isolation --no-deps "$WORK/wheelchip"
"$DP" backends | grep -q "^wheelchip *available"
"$DP" conformance --backend wheelchip --tier quick >"$WORK/wheelchip.txt" || { cat "$WORK/wheelchip.txt"; exit 1; }
tail -1 "$WORK/wheelchip.txt"

step "the sdist's own tests run from the unpacked sdist"
(cd "$SRC" && "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_packaging.py tests/test_config.py)
step "done"
