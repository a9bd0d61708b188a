"""fp8_gemm at DeepSeek-V3 shapes: deepport's Triton kernel vs bf16 torch.matmul and blockwise torch._scaled_mm.

Usage (on a GPU):  python benchmarks/fp8_gemm.py --backend cuda [--m 1,64,512,4096] [--json F] [--markdown F]
Smoke (no GPU):    TRITON_INTERPRET=1 python benchmarks/fp8_gemm.py --backend cuda --smoke
Each row: TFLOP/s of the three paths and the Triton result's error against cpu_ref's fp8_gemm on the same
codes. The smoke run uses small shapes in the interpreter: it checks the wiring, its timings mean nothing.
Commit hardware reports to docs/hardware/ with the device and date.
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

import torch

from deepport.backends.cpu_ref import ops as ref
from deepport.core import registry
from deepport.core.formats import quantize_weight

# (name, N, K) of DeepSeek-V3's fp8 linears (dim 7168, q_lora 1536, kv_lora 512 + rope 64, 128 heads)
SHAPES = [("wq_a", 1536, 7168), ("wq_b", 24576, 1536), ("wkv_a", 576, 7168), ("wkv_b", 32768, 512),
          ("wo", 7168, 16384), ("dense_w1", 18432, 7168), ("dense_w2", 7168, 18432),
          ("expert_w1", 2048, 7168), ("expert_w2", 7168, 2048)]
SMOKE_SHAPES = [("smoke_ragged_n", 200, 256), ("smoke_square", 256, 384)]


def scaled_mm_blockwise(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """DeepSeek's recipe through torch._scaled_mm (sm90, cuBLASLt >= 12.9 only): A 1x128, B 128x128 scales."""
    kb = a_scale.shape[1]
    kb_pad = -(-kb // 4) * 4
    scale_a = a_scale.t().contiguous().t()  # [M, K/128], M-major
    scale_b = torch.zeros(b_scale.shape[0], kb_pad, dtype=torch.float32, device=b_scale.device)
    scale_b[:, :kb] = b_scale
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b.t(), out_dtype=out_dtype)


def _time_ms(fn, smoke: bool) -> float | None:
    if smoke:
        return None
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def _tflops(m, n, k, ms):
    return None if ms is None else 2 * m * n * k / (ms * 1e-3) / 1e12


def _rel_err(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def bench_row(table, name, m, n, k, smoke: bool, gen) -> dict:
    dev, fmt = table.device, table.fp8
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = 0.02 * torch.randn(n, k, generator=gen)
    codes_b, scale_b = quantize_weight(w, fmt)
    x, w_bf16, codes_b, scale_b = x.to(dev), w.to(torch.bfloat16).to(dev), codes_b.to(dev), scale_b.to(dev)
    codes_a, scale_a = table.act_quant(x, fmt)
    got = table.fp8_gemm(codes_a, scale_a, codes_b, scale_b)
    want = ref.fp8_gemm(codes_a, scale_a, codes_b, scale_b)  # torch code on the same device and codes
    row = {"shape": name, "M": m, "N": n, "K": k, "triton_max_rel_err": _rel_err(got, want)}
    row["triton_ms"] = _time_ms(lambda: table.fp8_gemm(codes_a, scale_a, codes_b, scale_b), smoke)
    row["bf16_matmul_ms"] = _time_ms(lambda: x @ w_bf16.T, smoke)
    try:
        sm = scaled_mm_blockwise(codes_a, scale_a, codes_b, scale_b)
        err = _rel_err(sm, want)
        if err > 2e-2:
            raise RuntimeError(f"wrong result (max rel err {err:.2e}): scale layout not accepted as DeepSeek's")
        row["scaled_mm_ms"], row["scaled_mm_max_rel_err"] = _time_ms(
            lambda: scaled_mm_blockwise(codes_a, scale_a, codes_b, scale_b), smoke), err
    except Exception as e:  # absent off sm90 / old cuBLASLt / CPU: recorded, not fatal
        row["scaled_mm_ms"], row["scaled_mm_unavailable"] = None, f"{type(e).__name__}: {str(e)[:200]}"
    for path in ("triton", "bf16_matmul", "scaled_mm"):
        row[f"{path}_tflops"] = _tflops(m, n, k, row[f"{path}_ms"])
    return row


def _device_name(table) -> str:
    if table.device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{table.device.type} ({registry.get_backend(table.backend).evidence_label()})"


def write_markdown(report: dict, path: str) -> None:
    lines = [f"# fp8_gemm on {report['device']} ({report['backend']}, {report['fp8_format']}), {report['date']}", "",
             "| shape | M | N | K | triton TFLOP/s | bf16 matmul TFLOP/s | scaled_mm TFLOP/s | triton max rel err |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in report["rows"]:
        lines.append(f"| {r['shape']} | {r['M']} | {r['N']} | {r['K']} | {f(r['triton_tflops'])} | "
                     f"{f(r['bf16_matmul_tflops'])} | {f(r['scaled_mm_tflops'])} | {r['triton_max_rel_err']:.1e} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--m", default="1,64,512,4096", help="comma-separated token counts")
    ap.add_argument("--smoke", action="store_true", help="small shapes, no timings (interpreter / CI)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args(argv)
    b = registry.get_backend(a.backend)
    registry.check_dtype(b, "fp8")
    table = registry.bind(b, fallback="error")
    ms = [1, 33] if a.smoke else [int(v) for v in a.m.split(",")]
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    rows = [bench_row(table, name, m, n, k, a.smoke, gen) for name, n, k in (SMOKE_SHAPES if a.smoke else SHAPES)
            for m in ms]
    report = {"backend": b.name, "label": b.evidence_label(), "device": _device_name(table),
              "fp8_format": table.fp8.name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    print(json.dumps(report, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if a.markdown:
        write_markdown(report, a.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
