"""`deepport hardware-report` (deepport/hardware_report.py): stages in subprocesses within a budget, a crash or a
hang recorded and the next stage still run, the report files; the whole --smoke run under the interpreter (slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepport import hardware_report as hr
from deepport.core.ops import CONTRACTS

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CRASH = ("import os, sys; print('partial output'); "
         "sys.stderr.write('RuntimeError: CUDA error: an illegal memory access was encountered\\n'); "
         "sys.stderr.flush(); os.abort()")


def test_a_crash_and_a_hang_are_recorded_and_the_next_stage_runs(tmp_path):
    extra = [hr.Stage("crash", [PY, "-c", CRASH], 60, 1),
             hr.Stage("hang", [PY, "-c", "import time; time.sleep(120)"], 2, 1),
             hr.Stage("after", [PY, "-c", "print('{\"answer\": 42}')"], 60, 1, stdout_json=True)]
    report, out = hr.run_report("cpu_ref", budget_s=300, output=tmp_path, smoke=True,
                                only=["backends", "full-silu_mul", "crash", "hang", "after"], extra_stages=extra)
    by = {r["stage"]: r for r in report["stages"]}
    assert list(by) == ["backends", "full-silu_mul", "crash", "hang", "after"]
    assert by["backends"]["status"] == "pass" and by["full-silu_mul"]["status"] == "pass"
    assert by["crash"]["status"] == "error" and by["crash"]["rc"] < 0
    assert "SIGABRT" in by["crash"]["reason"] and "illegal memory access" in by["crash"]["reason"]
    assert by["hang"]["status"] == "timeout" and by["hang"]["seconds"] < 30
    assert by["after"]["status"] == "pass" and json.loads((out / "after.json").read_text()) == {"answer": 42}
    assert report["counts"] == {"pass": 3, "fail": 0, "error": 1, "timeout": 1, "skipped": 0}
    # the files: report.json, summary.md, each stage's own report and its logs
    assert json.loads((out / "report.json").read_text())["counts"] == report["counts"]
    assert out.name.endswith("-smoke-" + report["meta"]["date"][:10])
    assert (out / "logs" / "crash.stdout.txt").read_text() == "partial output\n"
    assert (out / "full-silu_mul.json").is_file() and (out / "backends.json").is_file()
    summary = (out / "summary.md").read_text()
    assert "| crash | error |" in summary and "| hang | timeout |" in summary and "meaningless" in summary
    assert "| silu_mul |" in summary  # the conformance matrix from full-silu_mul.json
    assert report["conformance_matrix"]["silu_mul"]["full bf16"]["pass"] >= 1


def test_out_of_budget_and_planned_skips_state_their_reason(tmp_path):
    stages = [hr.Stage("quick", [PY, "-c", "pass"], 60, 0.1),
              hr.Stage("needs-time", [PY, "-c", "pass"], 60, 3600),
              hr.Stage("gpu-only", [PY, "-c", "pass"], 60, 0.1, skip="needs a GPU"),
              hr.Stage("leaves-room", [PY, "-c", "pass"], 60, 5, reserve_s=100),
              hr.Stage("bench", [PY, "-c", "pass"], 60, 5)]
    res = hr.run_stages(stages, tmp_path, budget_s=102)
    assert [r["status"] for r in res] == ["pass", "skipped", "skipped", "skipped", "pass"]
    assert "the stage needs at least 3600 s" in res[1]["reason"] and res[2]["reason"] == "needs a GPU"
    assert "100 s of it kept for the benchmarks after it" in res[3]["reason"]


def test_smoke_plan_covers_every_stage_and_a_gpu_plan_adds_the_step_comparison():
    smoke = hr.plan("cuda", True, {"device_type": "cpu", "memory_bytes": 8 << 30}, {"--compile", "--graphs"})
    names = [s.name for s in smoke]
    assert names[:3] == ["backends", "conformance-quick", "model-check"]
    assert {f"full-{op}" for op in CONTRACTS} <= set(names)
    assert names.index("full-silu_mul") < names.index("full-fp8_gemm") < names.index("full-moe_experts")
    assert names[-5:] == ["bench-ops", "bench-embedded-eager", "bench-embedded-compile", "bench-tiny-eager",
                          "bench-tiny-compile"]
    assert all(s.skip for s in smoke if s.name.endswith("-compile"))  # stated, not silently dropped
    gpu = hr.plan("cuda", False, {"device_type": "cuda", "memory_bytes": 80 << 30}, {"--compile", "--graphs"})
    step = [s for s in gpu if s.name.endswith("-graphs")]
    assert len(step) == 2 and not any(s.skip for s in gpu)
    assert "--compile" in step[0].argv and "--graphs" in step[0].argv
    assert all("--smoke" not in s.argv for s in gpu) and "full" in gpu[3].argv
    assert all(s.reserve_s == hr.FULL_TIER_RESERVE_S for s in gpu if s.name.startswith("full-"))


def test_summary_reads_eager_and_step_comparison_benches():
    results = [{"stage": "bench-embedded-eager", "status": "pass", "seconds": 1.0,
                "result": {"model": "m", "dtype": "fp8", "plain": {"decode_tokens_per_s": 120.0,
                                                                 "prefill_tokens_per_s": 900.0}}},
               {"stage": "bench-embedded-graphs", "status": "pass", "seconds": 1.0,
                "result": {"model": "m", "dtype": "fp8", "step_compare": {
                    "eager": {"decode_tokens_per_s": 100.0, "speedup_vs_eager": 1.0, "tokens_equal_eager": True},
                    "graphs": {"decode_tokens_per_s": 250.0, "speedup_vs_eager": 2.5, "tokens_equal_eager": False}}}}]
    rows = hr.e2e_rows(results)
    assert [(r["variant"], r["decode_tokens_per_s"]) for r in rows] == [("eager", 120.0), ("eager", 100.0),
                                                                         ("graphs", 250.0)]
    report = {"device": {"name": "GPU X", "label": "hardware: GPU X"}, "stages": results, "conformance_matrix": {},
              "anchors": [{"name": "a", "target": 2.0, "value": 2.5, "meaningful": True}], "e2e": rows,
              "meta": {"date": "2026-12-02", "command": "deepport hardware-report", "budget_s": 480, "seconds": 10,
                       "smoke": False}}
    md = hr.summary_markdown(report)
    assert "| graphs | 250.0 | - | 2.50 | **no** |" in md and "| a | >= 2 | 2.50 | yes |" in md
    assert "meaningless" not in md


@pytest.mark.slow
def test_smoke_report_end_to_end_under_the_interpreter(tmp_path):
    """What CI runs: `TRITON_INTERPRET=1 deepport hardware-report --smoke` (every stage, tiny shapes, ~10 min)."""
    env = dict(os.environ, TRITON_INTERPRET="1", DEEPPORT_PROGRESS="0")
    proc = subprocess.run([PY, "-m", "deepport", "hardware-report", "--backend", "cuda", "--smoke", "--budget-s",
                           "1500", "--output", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=ROOT)
    (out,) = tmp_path.iterdir()
    report = json.loads((out / "report.json").read_text())
    bad = {r["stage"]: r.get("reason") for r in report["stages"] if r["status"] not in ("pass", "skipped")}
    assert not bad and proc.returncode == 0, (bad, proc.stderr[-3000:])
    skipped = {r["stage"]: r["reason"] for r in report["stages"] if r["status"] == "skipped"}
    assert set(skipped) == {"bench-embedded-compile", "bench-tiny-compile"}, skipped
    for r in report["stages"]:
        for f in r.get("files", []):
            assert (out / f).is_file(), f
    assert {"conformance-quick.json", "model-check.json", "bench-ops.json", "bench-ops.md",
            "summary.md"} <= {p.name for p in out.iterdir()}
    assert report["meta"]["timings"].startswith("meaningless") and report["device"]["interpreter"]
    assert all(a["meaningful"] is False for a in report["anchors"]) and len(report["anchors"]) == 4
    assert {r["variant"] for r in report["e2e"]} == {"eager", None}  # the skipped step stages have no numbers
    assert "## Conformance" in proc.stdout and "## End-to-end bench" in proc.stdout  # the summary is printed
