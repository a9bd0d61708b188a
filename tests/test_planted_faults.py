"""Planted-fault self-test: the suite must fail each deliberately broken backend, on the broken op only.

Each `planted_<fault>` backend is cpu_ref with exactly one realistic fault (tests/planted/faults.py), and
reaches deepport through the real entry-point path: a throwaway distribution on sys.path / PYTHONPATH.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepport.conformance import runner
from deepport.core import registry
from planted import faults, install

ROOT = Path(__file__).resolve().parents[1]
CONTROL = "silu_mul"  # an unbroken op run beside the broken one: it must still pass, natively
COMPOSED = {"act_quant": "linear", "fp8_gemm": "linear"}  # composite built from the broken primitive


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    path = install(tmp_path_factory.mktemp("planted") / "site")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(path))  # also invalidates importlib's caches, so entry points are re-read
        yield path


def test_planted_backends_arrive_through_entry_points(site):
    found = registry.discover()
    for fault in faults.FAULTS:
        b = found[f"planted_{fault}"]
        assert b.origin == "plugin" and b.evidence_label() == "planted fault"
    assert sys.modules[found["planted_noresidual"].load.__module__].__file__.startswith(str(site))


@pytest.mark.parametrize("fault", [f for f in faults.FAULTS if f not in faults.MULTI_RANK])
def test_suite_fails_each_planted_fault_on_its_op(site, fault):
    op = faults.FAULTS[fault][0]
    ops = [op, CONTROL] + ([COMPOSED[op]] if op in COMPOSED else [])
    rep = runner.run(f"planted_{fault}", tier="quick", ops=ops)
    assert rep.exit_code == 1
    failed = {r.op for r in rep.failed}
    assert op in failed, [(r.case, r.status, r.reason) for r in rep.results]
    assert failed <= {op, COMPOSED.get(op)}, failed
    assert all(r.reason for r in rep.failed)
    control = [r for r in rep.results if r.op == CONTROL]
    assert control and all(r.status == "pass" and r.impl == "native" for r in control)
    if op in COMPOSED:  # the bf16 path of the composite never touches the broken fp8 primitive
        assert all(r.status == "pass" for r in rep.results if r.op == COMPOSED[op] and r.dtype == "bf16")


def test_full_cli_run_fails_only_the_planted_op(site, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               DEEPPORT_PROGRESS="0")
    out, junit = tmp_path / "r.json", tmp_path / "r.xml"
    r = subprocess.run([sys.executable, "-m", "deepport", "conformance", "--backend", "planted_decodemask",
                        "--tier", "quick", "--json", str(out), "--junit", str(junit)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["backend"] == "planted_decodemask" and rep["label"] == "planted fault"
    res = rep["results"]
    assert {c["op"] for c in res if c["status"] == "fail"} == {"mla_decode"}
    others = [c for c in res if c["op"] != "mla_decode"]
    assert len({c["op"] for c in others}) >= 10
    assert all(c["status"] in ("pass", "skip") for c in others), [(c["case"], c["status"]) for c in others
                                                                 if c["status"] not in ("pass", "skip")]
    assert "mla_decode_mtp_bf16" in {c["case"] for c in res if c["status"] == "fail"}
    assert "<failure" in junit.read_text() and "mla_decode" in r.stdout


def test_model_check_fails_the_graph_of_a_planted_fault(site):
    rep = runner.run("planted_noresidual", tier="quick", ops=["rms_norm"], dtypes=("bf16",), model_check=True)
    failed = {r.case for r in rep.failed}
    assert "rms_norm_residual_bf16" in failed and "model_logits_bf16" in failed, failed
    assert all(r.impl == "native" for r in rep.results if r.op == "model")
