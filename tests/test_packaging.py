"""Packaging: the wheel's data files, one version source, the Python floor, license, sdist contents, docs.

The built wheel itself is installed and run from outside the checkout by scripts/wheel_check.sh (CI)."""
import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import deepport
from deepport import cli, cli_checks

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PKG = ROOT / "deepport"


def _package_files() -> list[Path]:
    """Every file of the package as git tracks it (a fresh sdist holds these), else as it is on disk."""
    try:
        out = subprocess.run(["git", "ls-files", "deepport"], cwd=ROOT, capture_output=True, text=True, check=True)
        files = [ROOT / f for f in out.stdout.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # an unpacked sdist: no git
        files = [f for f in PKG.rglob("*") if f.is_file()]
    return [f for f in files if f.is_file() and "__pycache__" not in f.parts]


def test_every_runtime_data_file_is_package_data():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["deepport"]
    shipped = {f for pattern in patterns for f in PKG.glob(pattern) if f.is_file()}
    data = [f for f in _package_files() if f.suffix not in (".py", ".pyc")]
    assert PKG / "backends" / "cuda" / "tuning.json" in data and PKG / "backends" / "rocm" / "tuning.json" in data
    missing = [str(f.relative_to(ROOT)) for f in data if f not in shipped]
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"


def test_one_version_source(capsys):
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "deepport.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", deepport.__version__)
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"deepport {deepport.__version__} (docs: ") and Path(cli_checks.docs_dir()).is_dir()


def test_python_floor_matches_the_code():
    floor = PYPROJECT["project"]["requires-python"]
    minor = int(re.fullmatch(r">=3\.(\d+)", floor).group(1))
    uses_tomllib = []
    for f in PKG.rglob("*.py"):
        src = f.read_text()
        ast.parse(src, filename=str(f), feature_version=(3, minor))  # no syntax newer than the floor
        if re.search(r"^\s*import tomllib|^\s*from tomllib", src, re.M):
            uses_tomllib.append(f)
    if uses_tomllib:  # tomllib is 3.11+; below that the code would need tomli
        assert minor >= 11, f"requires-python {floor} but {uses_tomllib[0]} imports tomllib (3.11+)"
    assert sys.version_info >= (3, minor)


def test_pins_have_upper_bounds_where_numerics_depend_on_them():
    deps = PYPROJECT["project"]["dependencies"]
    for name in ("torch", "safetensors", "tokenizers"):
        spec = next(d for d in deps if re.match(rf"{name}\b", d))
        assert ">=" in spec and "<" in spec.replace("<=", ""), spec
    for extra in ("cuda", "rocm"):
        (triton,) = [d for d in PYPROJECT["project"]["optional-dependencies"][extra] if d.startswith("triton")]
        assert re.fullmatch(r"triton>=3\.\d+,<\d+\.\d+", triton), triton


def test_license_covers_code_and_weights():
    assert PYPROJECT["project"]["license"] and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Permission is hereby granted" in text and "deepport/models/tiny" in text and "Python Software" in text


def test_sdist_manifest_holds_what_the_tests_need():
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    for needed in ("tests", "docs", "benchmarks"):
        assert needed in manifest, f"MANIFEST.in does not graft {needed}/"
    for f in ("tests/conftest.py", "tests/hf_oracle.py", "tests/npu_standin", "tests/planted"):
        assert (ROOT / f).exists()


def test_docs_named_in_messages_exist():
    named = set()
    for f in PKG.rglob("*.py"):
        named.update(re.findall(r"docs/([A-Za-z0-9_/.-]+\.md)", f.read_text()))
    docs = ROOT / "docs" if (ROOT / "docs").is_dir() else PKG / "docs"
    missing = sorted(n for n in named if not (docs / n).is_file())
    assert not missing, f"messages or docstrings name docs that do not exist: {missing}"
