"""`deepport conformance --backend ascend` under the CPU torch_npu stand-in: passes, labelled "stand-in"."""
import json
import os
import subprocess
import sys
import warnings

from ascend_standin import STANDIN, npu  # noqa: F401  (fixture)
from deepport.core import ops as contracts


def test_quick_bf16_passes_with_every_op_named(npu):
    from deepport.backends.ascend import ops
    from deepport.conformance.runner import run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run("ascend", tier="quick", dtypes=("bf16",), fallback="error")
    said = [str(w.message) for w in caught]  # one warning per reason a call left the fused op
    assert report.label == "stand-in" and report.exit_code == 0
    assert {r.status for r in report.results} == {"pass"}
    fp8_only = {"act_quant", "weight_dequant", "fp8_gemm"}  # their cases are fp8 cases
    assert {r.op for r in report.results} == set(contracts.CONTRACTS) - fp8_only
    assert {r.impl for r in report.results if r.op != "linear"} == {"native"}
    taken = ops.paths()
    fused = {op for (op, path), n in taken.items() if path != ops.GENERIC}
    # every op with a torch_npu kernel ran it on at least one quick case
    assert fused == {op for op, what in ops.PROVENANCE.items() if what.startswith("torch_npu.")}
    # outside the chip limits the generic path ran, for a recorded reason (page size 4; 64 experts on a 910B)
    assert taken[("mla_decode", ops.GENERIC)] >= 1 and any("mla_decode" in m and "block size 4" in m for m in said)
    assert taken[("moe_gate", ops.GENERIC)] >= 1 and any("moe_gate" in m and "256 experts" in m for m in said)


def test_cli_labels_stand_in(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(STANDIN), NPU_STANDIN_SOC="223")
    env.pop("DEEPPORT_DEVICE", None)  # the stand-in maps the device to CPU itself
    out = tmp_path / "ascend.json"
    p = subprocess.run([sys.executable, "-m", "deepport", "conformance", "--backend", "ascend", "--tier", "quick",
                        "--dtype", "bf16", "--ops", "rope,mla_decode,silu_mul", "--json", str(out)],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "backend ascend (stand-in)" in p.stdout
    data = json.loads(out.read_text())
    assert data["label"] == "stand-in" and data["summary"]["fail"] == 0 and data["summary"]["pass"] >= 6


def test_fp8_cases_run_on_950_and_skip_on_910b(npu, monkeypatch):
    from deepport.conformance.runner import run

    fp8_ops = ["act_quant", "weight_dequant", "fp8_gemm"]
    report = run("ascend", tier="quick", dtypes=("fp8",), ops=fp8_ops)
    assert report.results and {r.status for r in report.results} == {"skip"}  # 910B: no fp8
    monkeypatch.setenv("NPU_STANDIN_SOC", "260")
    report = run("ascend", tier="quick", dtypes=("fp8",), ops=fp8_ops)
    assert report.label == "stand-in" and {r.status for r in report.results} == {"pass"}
