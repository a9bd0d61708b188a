"""Conformance results and their writers: terminal table, JSON (schema below), JUnit XML, markdown matrix.

JSON schema (version 1; documented in docs/conformance.md): {schema_version, tool, backend, label, tier,
dtypes, fallback, device, fp8_format, versions{deepport, python, torch, triton}, created, seconds,
summary{pass, fail, xfail, skip, fallback, total}, policy[...], results[CaseResult...]}.
"""
from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field

from deepport.core import output_dir

SCHEMA_VERSION = 1
STATUSES = ("pass", "fail", "xfail", "skip", "fallback")


@dataclass
class CaseResult:
    op: str
    case: str
    dtype: str
    status: str  # pass | fail | xfail | skip | fallback
    impl: str  # native | composite | fallback ("" when the op never ran)
    max_abs: float | None = None
    max_rel: float | None = None
    rtol: float | None = None
    atol: float | None = None
    reason: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    backend: str
    label: str
    tier: str
    results: list[CaseResult]
    policy: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # dtypes, fallback, device, fp8_format, versions, created, seconds

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> dict:
        c = Counter(r.status for r in self.results)
        return {**{s: c.get(s, 0) for s in STATUSES}, "total": len(self.results)}

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "tool": "deepport conformance", "backend": self.backend,
                "label": self.label, "tier": self.tier, **self.meta, "summary": self.summary(),
                "policy": self.policy, "results": [_finite(asdict(r)) for r in self.results]}


def _finite(row: dict) -> dict:
    """Strict JSON: a non-finite error (NaN or inf output) becomes null; the reason says what happened."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _num(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def write_json(report: Report, path) -> None:
    """The JSON report to `path` (atomically), or on stdout when path is "-" (the --json convention)."""
    from deepport import json_out

    json_out.emit_json(report.to_dict(), path, allow_nan=False)


def print_table(report: Report, file=None) -> None:
    """Terminal table: op, case, status, max abs/rel error, tolerance, impl; then reasons and the summary."""
    file = file or sys.stdout
    w = max([len(r.case) for r in report.results] + [4])
    print(f"deepport conformance: backend {report.backend} ({report.label}), tier {report.tier}", file=file)
    print(f"{'op':<15} {'case':<{w}} {'status':<8} {'max abs':>9} {'max rel':>9} {'rtol':>8} {'atol':>8}  impl", file=file)
    for r in report.results:
        print(f"{r.op:<15} {r.case:<{w}} {r.status:<8} {_num(r.max_abs):>9} {_num(r.max_rel):>9} "
              f"{_num(r.rtol):>8} {_num(r.atol):>8}  {r.impl or '-'}", file=file)
    notes = [r for r in report.results if r.reason and r.status != "pass"]
    for r in notes:
        print(f"  {r.status}: {r.case}: {r.reason}", file=file)
    if report.meta.get("fp8_checkpoints_served_as"):
        print(f"  FP8 checkpoints are served as {report.meta['fp8_checkpoints_served_as']} on {report.backend} "
              f"(no fp8 arithmetic; weights dequantised once at load)", file=file)
    unfused = {op: src for op, src in report.meta.get("sources", {}).items() if src.startswith("generic")}
    if unfused:
        print(f"  bound to the backend's generic torch path (no fused kernel): {', '.join(unfused)}", file=file)
    for p in report.policy:
        target = p.get("case") or f"op {p.get('op')}"
        extra = "".join(f" {k}={p[k]:g}" for k in ("rtol", "atol") if k in p)
        print(f"  policy {p['kind']}: {target}{extra}: {p['reason']} ({p.get('source')})", file=file)
    s = report.summary()
    print(", ".join(f"{s[k]} {k}" for k in STATUSES) + f" of {s['total']} cases", file=file)


def write_junit(report: Report, path) -> None:
    """JUnit XML: one <testsuite> per op, one <testcase> per case; fail -> <failure>, skip/xfail -> <skipped>."""
    s = report.summary()
    root = ET.Element("testsuites", name=f"deepport conformance {report.backend}", tests=str(s["total"]),
                      failures=str(s["fail"]), skipped=str(s["skip"] + s["xfail"]), errors="0",
                      time=f"{sum(r.seconds for r in report.results):.3f}")
    by_op: dict[str, list[CaseResult]] = {}
    for r in report.results:
        by_op.setdefault(r.op, []).append(r)
    for op, rs in by_op.items():
        c = Counter(r.status for r in rs)
        suite = ET.SubElement(root, "testsuite", name=op, tests=str(len(rs)), failures=str(c["fail"]),
                              skipped=str(c["skip"] + c["xfail"]), errors="0",
                              time=f"{sum(r.seconds for r in rs):.3f}")
        props = ET.SubElement(suite, "properties")
        for k, v in (("backend", report.backend), ("label", report.label), ("tier", report.tier)):
            ET.SubElement(props, "property", name=k, value=v)
        for r in rs:
            tc = ET.SubElement(suite, "testcase", classname=f"deepport.conformance.{op}", name=r.case,
                               time=f"{r.seconds:.3f}")
            if r.status == "fail":
                ET.SubElement(tc, "failure", message=r.reason[:500] or "mismatch", type="mismatch").text = r.reason
            elif r.status in ("skip", "xfail"):
                ET.SubElement(tc, "skipped", message=f"{r.status}: {r.reason}")
            msg = f"status={r.status} impl={r.impl} max_abs={_num(r.max_abs)} max_rel={_num(r.max_rel)} " \
                  f"rtol={_num(r.rtol)} atol={_num(r.atol)}"
            ET.SubElement(tc, "system-out").text = msg + (f"\n{r.reason}" if r.reason else "")
    ET.indent(root)
    xml = ET.tostring(root, encoding="unicode")
    output_dir.write_text(path, "<?xml version='1.0' encoding='utf-8'?>\n" + xml)  # atomically, as the JSON


def _cell(rs: list[CaseResult]) -> str:
    if not rs:
        return "-"
    c = Counter(r.status for r in rs)
    impls = sorted({r.impl for r in rs if r.impl})
    if c["fail"]:
        head = f"FAIL {c['fail']}/{len(rs)}"
    elif c["fallback"]:
        head = "fallback"
    elif c["pass"] == len(rs):
        head = "pass"
    elif c["skip"] == len(rs):
        return "skip"
    else:
        head = ", ".join(f"{n} {s}" for s, n in c.items())
    return f"{head} ({'/'.join(impls)})" if impls else head


def matrix_markdown(reports: list[Report]) -> str:
    """Capability matrix: one row per op, one column per backend x dtype; each cell status (impl)."""
    dtypes = ("fp8", "bf16", "fp32")
    cols = [(rep, d) for rep in reports for d in dtypes if d != "fp32" or any(r.dtype == d for r in rep.results)]
    ops = list(dict.fromkeys(r.op for rep in reports for r in rep.results))
    lines = ["# deepport conformance: capability matrix", ""]
    for rep in reports:
        s = rep.summary()
        lines.append(f"- **{rep.backend}** ({rep.label}), tier {rep.tier}: " + ", ".join(f"{s[k]} {k}" for k in STATUSES))
    lines += ["", "| op | " + " | ".join(f"{rep.backend} {d} ({rep.label})" for rep, d in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for op in ops:
        cells = [_cell([r for r in rep.results if r.op == op and r.dtype == d]) for rep, d in cols]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: status (how the op was bound: native, composite or fallback); `-`: the op has no case "
              "of that dtype (fp8 cases exist only where the contract takes fp8 codes)."]
    notes = [(rep, r) for rep in reports for r in rep.results if r.status in ("fail", "xfail", "skip")]
    if notes:
        lines += ["", "## Not passing", ""]
        lines += [f"- {rep.backend} `{r.case}`: {r.status}: {r.reason}" for rep, r in notes]
    pol = [(rep, p) for rep in reports for p in rep.policy]
    if pol:
        lines += ["", "## Policy entries (the backend's conformance.toml)", ""]
        lines += [f"- {rep.backend} {p['kind']} {p.get('case') or 'op ' + p.get('op', '')}: {p['reason']}" for rep, p in pol]
    return "\n".join(lines) + "\n"


def write_markdown(report: Report | list[Report], path) -> None:
    reports = report if isinstance(report, list) else [report]
    output_dir.write_text(path, matrix_markdown(reports))  # atomically: a reader never sees half a report
