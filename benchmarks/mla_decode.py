"""mla_decode at DeepSeek-V3 shapes: GB/s of the paged latent-cache read vs the device's measured copy bandwidth.

Usage (on a GPU):  python benchmarks/mla_decode.py --backend cuda [--batch 1,16,64] [--ctx 1024,4096,16384]
Smoke (no GPU):    TRITON_INTERPRET=1 python benchmarks/mla_decode.py --backend cuda --smoke
Bytes counted: each sequence's cached latent + rope rows (576 x 2 bytes per token in bf16), the queries and
the output. Copy bandwidth: 2 x bytes / time of a 1 GiB tensor copy. The error column is the max abs
difference from cpu_ref's mla_decode on the same inputs and device. The smoke run uses small shapes in the
interpreter: it checks the wiring, its timings mean nothing. Commit hardware reports to docs/hardware/.
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone

import torch

from deepport.backends.cpu_ref import ops as ref
from deepport.core import registry

V3 = dict(heads=128, kv_lora_rank=512, rope=64, page=64)
SMOKE = dict(heads=4, kv_lora_rank=64, rope=16, page=16)


def _time_ms(fn, smoke: bool) -> float | None:
    if smoke:
        return None
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def copy_bandwidth_gbs(device, smoke: bool) -> float | None:
    """Device memory bandwidth as a plain copy achieves it (read + write), in GB/s."""
    if smoke:
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), smoke)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_row(table, batch, ctx, s, dims, smoke, gen) -> dict:
    dev, h, c, r, page = table.device, dims["heads"], dims["kv_lora_rank"], dims["rope"], dims["page"]
    lens = [max(s, ctx - 7 * i) for i in range(batch)]  # slightly different lengths, none a page multiple
    max_blocks = -(-max(lens) // page)
    n_blocks = batch * max_blocks
    q_latent = torch.randn(batch, s, h, c, generator=gen).to(torch.bfloat16).to(dev)
    q_pe = torch.randn(batch, s, h, r, generator=gen).to(torch.bfloat16).to(dev)
    kv_cache = torch.randn(n_blocks, page, c, generator=gen).to(torch.bfloat16).to(dev)
    pe_cache = torch.randn(n_blocks, page, r, generator=gen).to(torch.bfloat16).to(dev)
    block_table = torch.randperm(n_blocks, generator=gen).view(batch, max_blocks).to(torch.int32).to(dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    scale = (128 + 64) ** -0.5
    args = (q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale)
    got = table.mla_decode(*args)
    want = ref.mla_decode(*args)
    row = {"batch": batch, "ctx": ctx, "S": s, "heads": h, "max_abs_err": float((got.float() - want.float()).abs().max())}
    row["ms"] = _time_ms(lambda: table.mla_decode(*args), smoke)
    nbytes = sum(lens) * (c + r) * 2 + 2 * q_latent.numel() * 2 + q_pe.numel() * 2
    row["gbs"] = None if row["ms"] is None else nbytes / (row["ms"] * 1e-3) / 1e9
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--ctx", default="1024,4096,16384")
    ap.add_argument("--s", type=int, default=1, help="new tokens per sequence (2 with MTP verification)")
    ap.add_argument("--smoke", action="store_true", help="small shapes, no timings (interpreter / CI)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args(argv)
    b = registry.get_backend(a.backend)
    table = registry.bind(b, fallback="error")
    dims = SMOKE if a.smoke else V3
    batches, ctxs = ([2], [40]) if a.smoke else ([int(v) for v in a.batch.split(",")], [int(v) for v in a.ctx.split(",")])
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    copy = copy_bandwidth_gbs(table.device, a.smoke)
    rows = [bench_row(table, bt, ctx, a.s, dims, a.smoke, gen) for bt in batches for ctx in ctxs]
    for row in rows:
        row["fraction_of_copy_bw"] = None if row["gbs"] is None or not copy else row["gbs"] / copy
    device = torch.cuda.get_device_name() if table.device.type == "cuda" and torch.cuda.is_available() \
        else f"{table.device.type} ({b.evidence_label()})"
    report = {"backend": b.name, "label": b.evidence_label(), "device": device, "copy_gbs": copy,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "triton": __import__("triton").__version__},
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    print(json.dumps(report, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if a.markdown:
        f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        lines = [f"# mla_decode on {device} ({b.name}), {report['date']}", "",
                 f"Copy bandwidth: {f(copy)} GB/s", "",
                 "| batch | ctx | S | ms | GB/s | of copy bw | max abs err |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['ctx']} | {r['S']} | {f(r['ms'], 3)} | {f(r['gbs'])} | "
                  f"{f(r['fraction_of_copy_bw'], 2)} | {r['max_abs_err']:.1e} |" for r in rows]
        with open(a.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
