"""benchmarks/fp8_gemm.py wiring, in its smoke mode under the interpreter (timings need a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fp8_gemm_benchmark_smoke(tmp_path):
    out, md = tmp_path / "fp8_gemm.json", tmp_path / "fp8_gemm.md"
    env = dict(os.environ, TRITON_INTERPRET="1", DEEPPORT_PROGRESS="0")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_gemm.py"), "--backend", "cuda", "--smoke",
                           "--json", str(out), "--markdown", str(md)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["label"] == "interpreter" and report["fp8_format"] == "e4m3fn"
    assert len(report["rows"]) == 4
    for row in report["rows"]:
        assert row["triton_max_rel_err"] < 1e-2, row  # same codes as cpu_ref: only summation order differs
        assert row["triton_tflops"] is None  # no timings in the interpreter
        assert row["scaled_mm_ms"] is None and "scaled_mm_unavailable" in row  # blockwise needs sm90
    assert "| smoke_ragged_n | 33 | 200 | 256 |" in md.read_text()
