"""pytest integration: `pytest --deepport-backend NAME --pyargs deepport.conformance.suite` from any directory."""
import os
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from deepport.conformance.cases import all_cases
from planted import install

ROOT = Path(__file__).resolve().parents[1]
# The checkout's editable install may predate the pytest11 entry point, so name the plugin explicitly.
BASE = ["-m", "pytest", "-p", "deepport.conformance.pytest_plugin", "--pyargs", "deepport.conformance.suite",
        "-p", "no:cacheprovider", "-W", "error::pytest.PytestUnknownMarkWarning", "--strict-markers"]


def _pytest(args, cwd, pythonpath=None):
    env = dict(os.environ, DEEPPORT_PROGRESS="0")
    env.pop("PYTEST_ADDOPTS", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *BASE, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=900)


def test_entry_point_is_declared():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert eps == {"deepport.conformance.pytest_plugin": "deepport.conformance.pytest_plugin"}


def test_cpu_ref_cases_run_as_marked_tests_from_any_directory(tmp_path):
    xml = tmp_path / "junit.xml"
    r = _pytest(["--deepport-backend", "cpu_ref", "--deepport-ops", "rms_norm,silu_mul,act_quant",
                 "-m", "rms_norm or act_quant", "--junitxml", str(xml), "-q"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    want = {c.name for c in all_cases("quick", ["rms_norm", "act_quant"])}
    cases = ET.parse(xml).getroot().iter("testcase")
    got = {tc.get("name").removeprefix("test_case[").removesuffix("]") for tc in cases}
    assert got == want  # ids are case names; -m <op> selects by op (silu_mul deselected)
    assert f"{len(want)} passed, {len(all_cases('quick', ['silu_mul']))} deselected" in r.stdout
    assert "PytestUnknownMarkWarning" not in r.stdout + r.stderr


def test_planted_fault_fails_only_its_cases(tmp_path):
    site = install(tmp_path / "site")
    r = _pytest(["--deepport-backend", "planted_noresidual", "--deepport-ops", "rms_norm,silu_mul",
                 "--deepport-dtype", "bf16", "-q", "-rf"], cwd=tmp_path, pythonpath=site)
    assert r.returncode == 1, r.stdout[-3000:]
    failed = {line.split("test_case[")[1].split("]")[0] for line in r.stdout.splitlines() if line.startswith("FAILED")}
    # the fault drops the residual add: exactly the rms_norm cases with a residual fail, the others pass
    fused = {c.name for c in all_cases("quick", ["rms_norm"]) if "residual" in c.make()}
    assert "rms_norm_residual_bf16" in fused and failed == fused, failed
    n_pass = len(all_cases("quick", ["rms_norm", "silu_mul"])) - len(fused)
    assert f"{len(fused)} failed, {n_pass} passed" in r.stdout, r.stdout[-1000:]
    assert "max abs" in r.stdout  # the failure names the numbers and the tolerance


def test_fallback_ops_are_skipped_never_passed_and_error_policy_fails(tmp_path):
    from deepport.porting import new_backend

    new_backend("mychip", tmp_path / "pkg")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(tmp_path / "site"), str(tmp_path / "pkg")], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    args = ["--deepport-backend", "mychip", "--deepport-ops", "silu_mul,rope", "-q", "-rs"]
    r = _pytest(args, cwd=tmp_path, pythonpath=tmp_path / "site")
    n_silu, n_rope = len(all_cases("quick", ["silu_mul"])), len(all_cases("quick", ["rope"]))
    assert r.returncode == 0 and f"{n_silu} passed, {n_rope} skipped" in r.stdout, r.stdout[-3000:]
    assert "fallback: the backend lacks rope" in r.stdout
    r = _pytest(args + ["--deepport-fallback", "error"], cwd=tmp_path, pythonpath=tmp_path / "site")
    assert r.returncode == 1 and f"{n_rope} failed, {n_silu} passed" in r.stdout, r.stdout[-3000:]


def test_inert_without_backend_and_usage_error_for_unknown(tmp_path):
    r = _pytest(["-q", "-rs"], cwd=tmp_path)
    assert r.returncode == 0 and "1 skipped" in r.stdout and "--deepport-backend NAME" in r.stdout
    r = _pytest(["--deepport-backend", "nosuch", "-q"], cwd=tmp_path)
    assert r.returncode == 4 and "unknown backend 'nosuch'" in r.stderr, r.stderr[-2000:]


def test_model_check_tests_with_their_own_mark(tmp_path):
    site = install(tmp_path / "site")
    r = _pytest(["--deepport-backend", "planted_noresidual", "--deepport-ops", "silu_mul", "--deepport-dtype", "bf16",
                 "--deepport-model-check", "-m", "model", "-q", "-rf"], cwd=tmp_path, pythonpath=site)
    failed = {line.split("[")[1].split("]")[0] for line in r.stdout.splitlines() if line.startswith("FAILED")}
    assert r.returncode == 1 and "model_logits_bf16" in failed, r.stdout[-3000:]
    # the silu_mul cases, not marked `model`
    assert f"{len(all_cases('quick', ['silu_mul'], ['bf16']))} deselected" in r.stdout
