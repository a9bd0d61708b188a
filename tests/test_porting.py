"""Porting kit: `deepport new-backend` writes a package that installs, is discovered, and is judged correctly."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deepport.core.errors import DeepportError
from deepport.porting import new_backend

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env=None, cwd=None, timeout=600):
    e = dict(os.environ, DEEPPORT_PROGRESS="0")
    e.pop("TRITON_INTERPRET", None)
    e.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, cwd=cwd or ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Generate `mychip` with the CLI and pip-install it into a private target dir (the venv is untouched)."""
    tmp = tmp_path_factory.mktemp("porting")
    r = _run(["-m", "deepport", "new-backend", "mychip", "--output", str(tmp / "pkg")])
    assert r.returncode == 0, r.stderr
    r = _run(["-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(tmp / "site"),
              str(tmp / "pkg")])
    assert r.returncode == 0, r.stderr
    return tmp


def test_generated_package_layout(installed):
    pkg = installed / "pkg"
    assert "[project.entry-points.deepport]\nmychip = \"deepport_mychip\"" in (pkg / "pyproject.toml").read_text()
    assert (installed / "site" / "deepport_mychip" / "conformance.toml").is_file()  # shipped as package data
    assert '"silu_mul": silu_mul' in (pkg / "deepport_mychip" / "ops.py").read_text()


def test_installed_package_is_discovered_as_plugin(installed):
    r = _run(["-m", "deepport", "backends", "--json"], env={"PYTHONPATH": str(installed / "site")}, cwd=installed)
    assert r.returncode == 0, r.stderr
    rows = {b["name"]: b for b in json.loads(r.stdout)}
    mine = rows["mychip"]
    assert mine["available"] and mine["origin"] == "plugin" and mine["device_type"] == "cpu"
    assert mine["ops"] == {"native": 1, "composite": 1, "fallback": 12}


def test_installed_package_conformance_native_and_fallback_split(installed):
    out = installed / "report.json"
    r = _run(["-m", "deepport", "conformance", "--backend", "mychip", "--tier", "quick", "--json", str(out)],
             env={"PYTHONPATH": str(installed / "site")}, cwd=installed)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    results = rep["results"]
    mine = [c for c in results if c["op"] == "silu_mul"]
    assert mine and all(c["impl"] == "native" and c["status"] == "pass" for c in mine), mine
    others = [c for c in results if c["op"] not in ("silu_mul", "linear", "model")]
    assert others and all(c["status"] in ("fallback", "skip") for c in others), \
        sorted({(c["op"], c["status"]) for c in others})
    assert {c["op"] for c in others if c["status"] == "fallback"} >= {"rms_norm", "moe_gate", "mla_decode"}
    assert not [c for c in results if c["status"] == "fail"]


def test_conformance_toml_example_is_a_valid_policy_once_uncommented(tmp_path):
    from deepport.conformance import policy
    from deepport.conformance.cases import case_names

    text = (new_backend("mychip", tmp_path / "pkg") / "deepport_mychip" / "conformance.toml").read_text()
    example = "\n".join(line[2:] for line in text.splitlines() if re.match(r"# (\[\[\w+\]\]|\w+ = )", line))
    (tmp_path / "c.toml").write_text(example)
    entries = policy.load(tmp_path / "c.toml", case_names()).as_list()
    assert [e["kind"] for e in entries] == ["xfail", "tolerance"] and all(e["reason"] for e in entries)


@pytest.mark.parametrize("name,why", [("My-Chip", "one lowercase word"), ("9chip", "one lowercase word"),
                                      ("cuda", "taken"), ("rocm", "taken")])
def test_bad_names_refused(tmp_path, name, why):
    with pytest.raises(DeepportError, match=why):
        new_backend(name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_empty_output_refused_and_empty_accepted(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DeepportError, match="not empty"):
        new_backend("mychip", tmp_path / "busy")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert (new_backend("mychip", tmp_path / "empty") / "deepport_mychip" / "ops.py").is_file()
    with pytest.raises(DeepportError, match="device string"):
        new_backend("other", tmp_path / "o2", device_type="NPU:0")


def test_cli_error_is_one_line_exit_2(tmp_path):
    (tmp_path / "x").write_text("a file")
    r = _run(["-m", "deepport", "new-backend", "mychip", "--output", str(tmp_path / "x")])
    assert r.returncode == 2 and "choose a new or empty directory" in r.stderr and "Traceback" not in r.stderr


def test_probe_of_a_missing_device_says_why(tmp_path):
    pkg = new_backend("farchip", tmp_path / "pkg", device_type="npu")
    r = _run(["-c", "import deepport_farchip as m; p = m.BACKEND.probe(); print(p.available, '|', p.reason)"],
             env={"PYTHONPATH": str(pkg)})
    assert r.returncode == 0, r.stderr
    available, reason = r.stdout.strip().split(" | ")
    assert available == "False" and "torch.npu is not available" in reason
