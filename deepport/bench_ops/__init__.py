"""`deepport bench ops`: one harness for the op benchmarks; each row gives the kernel, its baselines and the
device's physical limit side by side, with the error against cpu_ref.

One module per op (named like the op) defines UNIT, ``rows(table, limits, smoke, gen)`` yielding row dicts
({case, shape, kernel: {ms, rate, timer}, baselines: {name: {ms, rate} | {skipped}}, limit: {rate, what},
max_abs_err, max_rel_err}) and ``anchors(rows)``: the issue's targets as {name, target, value}. Timings come from
triton.testing.do_bench (CUDA graphs where the call allows) on a GPU and torch.utils.benchmark on a CPU; under
the Triton interpreter or with --smoke they are labelled meaningless.
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback
from datetime import datetime, timezone

from deepport import json_out

OPS = ("fp8_gemm", "mla_decode", "moe_experts")
NEEDS = {"fp8_gemm": ("fp8",), "mla_decode": ("bf16",), "moe_experts": ()}  # dtypes the backend must declare


def op_module(op: str):
    return importlib.import_module(f"deepport.bench_ops.{op}")


def run(backend: str = "auto", ops=OPS, smoke: bool = False, progress=None) -> dict:
    """Benchmark `ops` on `backend`; an op that raises is recorded with its traceback, the others still run."""
    import torch

    from deepport.bench_ops import harness
    from deepport.core import registry
    from deepport.core.errors import ConfigError

    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise ConfigError(f"unknown op benchmark(s) {', '.join(unknown)}; known: {', '.join(OPS)}")
    b = registry.select(backend) if backend in (None, "auto") else registry.get_backend(backend)
    table = registry.bind(b, fallback="error")
    t0 = time.perf_counter()
    limits = harness.measure_limits(table.device, smoke, table.fp8.dtype if table.fp8 else None)
    report = {"backend": b.name, "label": b.evidence_label(), "device": harness.device_name(table.device),
              "fp8_format": table.fp8.name if table.fp8 else None, "smoke": smoke,
              "timing": harness.timing_label(table.device, smoke),
              "timings_meaningful": harness.timings_meaningful(smoke),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "triton": _triton_version()},
              "limits": limits, "ops": {}}
    for op in ops:
        mod, t1 = op_module(op), time.perf_counter()
        entry = {"unit": mod.UNIT, "rows": []}
        missing = [d for d in NEEDS[op] if d not in b.dtypes]
        if missing:
            entry["skipped"] = f"backend {b.name} has no {', '.join(missing)}"
        else:
            gen = torch.Generator(device=table.device).manual_seed(0)
            kwargs = {"dtypes": tuple(d for d in ("fp8", "bf16") if d in b.dtypes)} if op == "moe_experts" else {}
            try:
                for row in mod.rows(table, limits, smoke, gen, **kwargs):
                    entry["rows"].append(row)
                    if progress:
                        progress(op, row)
            except Exception as e:  # recorded, not fatal: the other ops still run
                entry["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                entry["traceback"] = traceback.format_exc()[-4000:]
            entry["anchors"] = [{**a, "meaningful": report["timings_meaningful"]} for a in mod.anchors(entry["rows"])]
        entry["seconds"] = round(time.perf_counter() - t1, 1)
        report["ops"][op] = entry
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _f(v, p=1):
    return "-" if v is None else f"{v:.{p}f}"


def _g(v):
    """A rate: three significant digits (CPU smoke rates are tiny, GPU ones large)."""
    return "-" if v is None else f"{v:.3g}"


def met_text(anchor: dict) -> str:
    """yes / no against the target; "-" without a value; n/a when the timings mean nothing (smoke, interpreter)."""
    if anchor["value"] is None:
        return "-"
    if not anchor.get("meaningful", True):
        return "n/a (timings meaningless)"
    return "yes" if anchor["value"] >= anchor["target"] else "no"


def markdown(report: dict) -> str:
    """Per op: case | kernel ms, rate | each baseline ms, rate, kernel speed-up over it | limit, fraction | error."""
    lim = report["limits"]
    lines = [f"# Op benchmarks: {report['backend']} on {report['device']} ({report['label']}), {report['date']}", "",
             f"Timings: {report['timing']}. Limits measured here: copy {_g(lim['copy_gbs'])} GB/s, "
             f"bf16 matmul {_g(lim['bf16_tflops'])} TFLOP/s, fp8 {_g(lim.get('fp8_tflops'))} TFLOP/s "
             f"({lim.get('fp8_tflops_note')}).", ""]
    for op, e in report["ops"].items():
        lines += [f"## {op}", ""]
        if e.get("skipped"):
            lines += [f"Skipped: {e['skipped']}.", ""]
            continue
        if e.get("error"):
            lines += [f"**Error**: `{e['error']}` (after {len(e['rows'])} rows)", ""]
        if not e["rows"]:
            continue
        unit = e["unit"]
        bases = list(e["rows"][0]["baselines"])
        head = ["case", "kernel ms", f"kernel {unit}"]
        for bname in bases:
            head += [f"{bname} ms", f"{bname} {unit}", f"x vs {bname}"]
        head += [f"limit {unit}", "of limit", "max abs err", "max rel err"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in e["rows"]:
            k = r["kernel"]
            cells = [r["case"], _f(k["ms"], 3), _g(k["rate"])]
            for bname in bases:
                bl = r["baselines"][bname]
                if bl.get("skipped"):
                    cells += ["skipped", "-", "-"]
                    continue
                ratio = bl["ms"] / k["ms"] if bl.get("ms") and k["ms"] else None
                cells += [_f(bl["ms"], 3), _g(bl["rate"]), _f(ratio, 2)]
            frac = k["rate"] / r["limit"]["rate"] if k["rate"] and r["limit"]["rate"] else None
            cells += [_g(r["limit"]["rate"]), _f(frac, 2), f"{r['max_abs_err']:.1e}", f"{r['max_rel_err']:.1e}"]
            lines.append("| " + " | ".join(cells) + " |")
        skips = {f"{b}: {r['baselines'][b]['skipped']}" for r in e["rows"] for b in bases
                 if r["baselines"][b].get("skipped")}
        lines += [""] + [f"- skipped {s}" for s in sorted(skips)] + ([""] if skips else [])
        lines += [f"- limit: {w}" for w in dict.fromkeys(r["limit"]["what"] for r in e["rows"])] + [""]
    anchors = [a for e in report["ops"].values() for a in e.get("anchors", [])]
    if anchors:
        lines += ["## Targets (issue 14)", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
        for a in anchors:
            met = met_text(a)
            lines.append(f"| {a['name']} | >= {a['target']:g} | {_f(a['value'], 2)} | {met} |")
        lines.append("")
    return "\n".join(lines)


def cmd_bench_ops(a) -> int:
    ops = [o.strip() for o in a.op.split(",") if o.strip()] if a.op else list(OPS)

    def progress(op, row):
        k = row["kernel"]
        print(f"# {op} {row['case']}: {_f(k['ms'], 3)} ms, {_g(k['rate'])}, max rel err {row['max_rel_err']:.1e}",
              file=sys.stderr, flush=True)

    report = run(a.backend, ops, a.smoke, progress)
    text = markdown(report)
    json_out.emit_json(report, a.json, indent=1, default=str)
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write(text + "\n")
        print(f"wrote {a.markdown}", file=sys.stderr)
    print(text)
    return 1 if any(e.get("error") for e in report["ops"].values()) else 0


def register(bench_parser) -> None:
    """`deepport bench ops ...`: a sub-command of `deepport bench` (options go after `ops`)."""
    sub = bench_parser.add_subparsers(dest="bench_what", required=False, metavar="{ops}")
    p = sub.add_parser("ops", help="op benchmarks: kernel vs baselines vs the device's limits, error vs cpu_ref")
    p.add_argument("--backend", default="auto", help="backend name (default: DEEPPORT_BACKEND, else auto)")
    p.add_argument("--op", default=None, help=f"comma-separated ({', '.join(OPS)}; default all)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CI / interpreter): checks wiring, not speed")
    json_out.add_json_argument(p)
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the markdown tables")
    p.set_defaults(fn=cmd_bench_ops)
