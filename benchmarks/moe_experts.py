"""moe_experts at DeepSeek-V3 expert shapes: fused Triton MoE, TFLOP/s and weight GB/s, bf16 and fp8 (W8A8).

Usage (on a GPU):  python benchmarks/moe_experts.py --backend cuda [--m 1,16,128,1024,4096] [--experts 256]
Smoke (no GPU):    TRITON_INTERPRET=1 python benchmarks/moe_experts.py --backend cuda --smoke
FLOPs: 2 * M * k * 3 * D * I (gate, up, down per routed pair). Weight bytes: the experts that received at
least one token, 3 * D * I each (1 byte in fp8, 2 in bf16). The reference row times cpu_ref's torch code on
the same device (a per-expert loop), and the error column is the max abs difference from it. The smoke run
uses small shapes in the interpreter: it checks the wiring, its timings mean nothing.
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
from deepport.core.formats import Fp8Weight, quantize_weight

V3 = dict(dim=7168, inter=2048, topk=8)
SMOKE = dict(dim=256, inter=128, topk=4)


def _time_ms(fn, smoke: bool) -> float | None:
    if smoke:
        return None
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50)


def make_experts(n_experts, dim, inter, dtype_name, fmt, device, gen):
    """w1, w2, w3 built expert by expert on the device (fp8: quantised there), so host memory stays small."""
    ws = []
    for rows, cols in ((inter, dim), (dim, inter), (inter, dim)):
        if dtype_name == "fp8":
            codes = torch.empty(n_experts, rows, cols, dtype=fmt.dtype, device=device)
            scales = torch.empty(n_experts, -(-rows // 128), -(-cols // 128), dtype=torch.float32, device=device)
            for e in range(n_experts):
                w = torch.randn(rows, cols, generator=gen).to(device) * cols ** -0.5
                codes[e], scales[e] = quantize_weight(w, fmt)
            ws.append(Fp8Weight(codes, scales))
        else:
            ws.append(torch.stack([(torch.randn(rows, cols, generator=gen) * cols ** -0.5).to(torch.bfloat16)
                                   for _ in range(n_experts)]).to(device))
    return ws


def bench_row(table, m, n_experts, dims, dtype_name, ws, smoke, gen) -> dict:
    dev, d, i, k = table.device, dims["dim"], dims["inter"], dims["topk"]
    x = torch.randn(m, d, generator=gen).to(torch.bfloat16).to(dev)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(m)]).to(dev)
    weights = torch.rand(m, k, generator=gen).to(dev)
    got = table.moe_experts(x, weights, ids, *ws)
    with torch.no_grad():
        want = ref.moe_experts(x, weights, ids, *ws)
    row = {"dtype": dtype_name, "M": m, "experts": n_experts, "topk": k, "D": d, "I": i,
           "max_abs_err": float((got.float() - want.float()).abs().max())}
    row["ms"] = _time_ms(lambda: table.moe_experts(x, weights, ids, *ws), smoke)
    with torch.no_grad():
        row["reference_ms"] = _time_ms(lambda: ref.moe_experts(x, weights, ids, *ws), smoke)
    active = int(torch.unique(ids).numel())
    wbytes = active * 3 * d * i * (1 if dtype_name == "fp8" else 2)
    row["tflops"] = None if row["ms"] is None else 2 * m * k * 3 * d * i / (row["ms"] * 1e-3) / 1e12
    row["weight_gbs"] = None if row["ms"] is None else wbytes / (row["ms"] * 1e-3) / 1e9
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--m", default="1,16,128,1024,4096", help="comma-separated token counts")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--dtype", default="fp8,bf16")
    ap.add_argument("--smoke", action="store_true", help="small shapes, no timings (interpreter / CI)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args(argv)
    b = registry.get_backend(a.backend)
    table = registry.bind(b, fallback="error")
    dims = SMOKE if a.smoke else V3
    n_experts = 8 if a.smoke else a.experts
    ms = [1, 9] if a.smoke else [int(v) for v in a.m.split(",")]
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    rows = []
    for dtype_name in a.dtype.split(","):
        registry.check_dtype(b, dtype_name)
        ws = make_experts(n_experts, dims["dim"], dims["inter"], dtype_name, table.fp8, table.device, gen)
        rows += [bench_row(table, m, n_experts, dims, dtype_name, ws, a.smoke, gen) for m in ms]
        del ws
    device = torch.cuda.get_device_name() if table.device.type == "cuda" and torch.cuda.is_available() \
        else f"{table.device.type} ({b.evidence_label()})"
    report = {"backend": b.name, "label": b.evidence_label(), "device": device,
              "fp8_format": table.fp8.name if table.fp8 else None,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    print(json.dumps(report, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if a.markdown:
        f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        lines = [f"# moe_experts on {device} ({b.name}), {report['date']}", "",
                 "| dtype | M | experts | top-k | ms | TFLOP/s | weight GB/s | cpu_ref torch ms | max abs err |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['M']} | {r['experts']} | {r['topk']} | {f(r['ms'], 3)} | {f(r['tflops'])} | "
                  f"{f(r['weight_gbs'])} | {f(r['reference_ms'], 3)} | {r['max_abs_err']:.1e} |" for r in rows]
        with open(a.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
