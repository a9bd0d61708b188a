"""`deepport hardware-report`: the whole hardware verification in one command, within a time budget.

Detects the device, then runs, in order of value, each stage in its own subprocess (a crash, an illegal address
or an OOM is recorded and the next stage still runs): `backends`; conformance quick tier, all dtypes,
--fallback error; the end-to-end model check; the full tier op by op, cheapest first; the op benchmarks
(`deepport bench ops`); the end-to-end bench (eager, plus --compile / --graphs where `deepport bench` has them)
on the embedded model and on a V3-shaped preset sized to the device. A stage that no longer fits the budget is
skipped with the reason. Writes DIR/<device>-<date>/: report.json, summary.md (pass/fail matrix, the issue's
targets), each stage's own report files, and logs/ (stdout and stderr of every stage); prints the summary.
`--smoke` runs every stage at tiny shapes (CI, TRITON_INTERPRET=1 on a CPU): same files, timings meaningless.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from deepport import json_out
from deepport.bench_ops.harness import cpu_model

# The full tier's ops, cheapest first (elementwise, then routing and GEMMs, then attention and experts at V3 dims).
FULL_TIER_ORDER = ("silu_mul", "rms_norm", "rope", "act_quant", "sample", "weight_dequant", "moe_gate", "all_reduce",
                   "all_to_all", "fp8_gemm", "linear", "mla_prefill", "mla_decode", "moe_experts")
STATUSES = ("pass", "fail", "error", "timeout", "skipped")
# What the full tier (cheapest op first, the slowest at the end) leaves to the op benchmarks and the end-to-end
# bench: without them the report cannot say whether any speed target is met.
FULL_TIER_RESERVE_S = 150.0


@dataclass
class Stage:
    """One subprocess: `argv` after `python -m deepport` (or a full command when argv[0] is an executable path)."""

    name: str
    argv: list
    timeout_s: float  # the most it may run
    min_s: float = 5.0  # skipped when less budget than this is left
    outputs: tuple = ()  # report files the stage writes into the output directory
    stdout_json: bool = False  # its stdout is a JSON document (kept as <name>.json)
    note: str = ""
    env: dict = field(default_factory=dict)
    skip: str = ""  # planned as skipped, with this reason (e.g. a GPU-only stage in a CPU smoke run)
    reserve_s: float = 0.0  # budget this stage must leave to the stages after it

    def command(self) -> list:
        if self.argv and os.path.isabs(str(self.argv[0])):
            return [str(a) for a in self.argv]
        return [sys.executable, "-m", "deepport", *[str(a) for a in self.argv]]


def detect(backend: str = "auto") -> dict:
    """Device name, compute capability or gcnArch, memory, driver, torch/triton/python versions; cpu model on a CPU."""
    import torch

    from deepport.core import registry, settings

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "deepport": _version("deepport"), "cpu": cpu_model(), "interpreter": settings.triton_interpret(),
            "platform": platform.platform()}
    try:
        b = registry.select(backend) if backend in (None, "auto") else registry.get_backend(backend)
        info["backend"], info["label"] = b.name, b.evidence_label()
        probe = registry.safe_probe(b)
        info["backend_available"], info["backend_reason"] = probe.available, probe.reason
        dev = b.device()
    except Exception as e:  # an unknown backend is reported by the stages too; detection goes on
        info["backend"], info["backend_error"], dev = backend, f"{type(e).__name__}: {e}", torch.device("cpu")
    info["device_type"] = dev.type
    if dev.type == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, memory_bytes=int(p.total_memory), multiprocessors=p.multi_processor_count)
        if torch.version.hip:
            info.update(gcn_arch=p.gcnArchName, hip=torch.version.hip)
        else:
            info.update(capability=f"sm{p.major}{p.minor}", cuda=torch.version.cuda, driver=_nvidia_driver())
    else:
        info.update(name=info["cpu"], memory_bytes=_host_memory())
    return info


def _version(pkg):
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def _nvidia_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _host_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def bench_flags() -> set:
    """The options `deepport bench` has in this installation (e.g. --compile, --graphs), read from its parser."""
    from deepport.cli import build_parser

    ap = build_parser()
    for action in ap._subparsers._group_actions:  # argparse keeps subcommands here
        bench = action.choices.get("bench")
        if bench is not None:
            return {s for a in bench._actions for s in a.option_strings}
    return set()


def pick_preset(memory_bytes: int | None, smoke: bool) -> str:
    """The largest materialisable V3-shaped preset whose fp8 weights fit a quarter of the device memory and 4 GB
    (it is written to disk with random weights inside the budget); `tiny` in smoke mode."""
    from deepport import models
    from deepport.core.config import PRESETS

    if smoke:
        return "tiny"
    cap = min((memory_bytes or 0) // 4, 4 << 30)
    fits = [(_param_estimate(PRESETS[n]), n) for n in getattr(models, "MATERIALISABLE", ("tiny",)) if n in PRESETS]
    fits = sorted(p for p in fits if p[0] <= cap)
    return fits[-1][1] if fits else "tiny"


def _param_estimate(a) -> int:
    """Rough parameter count of a ModelArgs (embeddings, dense and MoE MLPs, attention)."""
    moe_layers = a.n_layers - a.n_dense_layers
    experts = (a.n_routed_experts + a.n_shared_experts) * 3 * a.dim * a.moe_inter_dim
    attn = a.dim * (a.q_lora_rank or a.dim) + a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) \
        + a.n_heads * (a.qk_nope_head_dim + a.v_head_dim) * (a.kv_lora_rank + a.dim)
    return 2 * a.vocab_size * a.dim + a.n_dense_layers * 3 * a.dim * a.inter_dim + moe_layers * experts \
        + a.n_layers * attn


def plan(backend: str, smoke: bool, device: dict, flags: set | None = None) -> list[Stage]:
    """The stages in order of value. Per-stage caps keep one stuck stage from eating the whole budget.

    Smoke (CPU, interpreter): the model check runs cpu_ref's graph for 2 steps in bf16 (the backend's graph takes
    ~10 min under the interpreter; its ops are checked one by one in the conformance stages), the end-to-end
    bench uses a short prompt, and the compiled/graphs step comparison is skipped (it profiles every variant;
    it needs a GPU to mean anything)."""
    from deepport.core.ops import CONTRACTS

    flags = bench_flags() if flags is None else flags
    tier = "quick" if smoke else "full"
    check = ["--backend", "cpu_ref", "--dtypes", "bf16", "--steps", "2"] if smoke else ["--backend", backend]
    s = [Stage("backends", ["backends", "--json"], 60, 3, stdout_json=True),
         Stage("conformance-quick", ["conformance", "--backend", backend, "--tier", "quick", "--dtype", "all",
                                     "--fallback", "error", "--json", "conformance-quick.json",
                                     "--markdown", "conformance-quick.md"], 300, 20,
               ("conformance-quick.json", "conformance-quick.md")),
         Stage("model-check", [sys.executable, "-m", "deepport.hardware_report", "model-check", *check,
                               "--json", "model-check.json"], 300, 20, ("model-check.json",),
               note="smoke: cpu_ref's graph, bf16, 2 steps (wiring only)" if smoke else "")]
    ops = sorted(CONTRACTS, key=lambda o: FULL_TIER_ORDER.index(o) if o in FULL_TIER_ORDER else len(FULL_TIER_ORDER))
    for op in ops:
        s.append(Stage(f"full-{op}", ["conformance", "--backend", backend, "--tier", tier, "--ops", op, "--dtype", "all",
                                      "--fallback", "error", "--json", f"full-{op}.json"], 150, 10,
                       (f"full-{op}.json",), note="smoke: quick-tier shapes" if smoke else "",
                       reserve_s=0 if smoke else FULL_TIER_RESERVE_S))
    s.append(Stage("bench-ops", ["bench", "ops", "--backend", backend, *(["--smoke"] if smoke else []),
                                 "--json", "bench-ops.json", "--markdown", "bench-ops.md"], 300, 30,
                   ("bench-ops.json", "bench-ops.md")))
    size = ["--max-new-tokens", "2", "--repeats", "1", "--prompt", "def f("] if smoke else \
        ["--max-new-tokens", "64", "--repeats", "3"]
    gpu = device.get("device_type") == "cuda"
    # eager, then one step comparison: eager vs torch.compile (vs CUDA/HIP graphs on a GPU) in one process
    step = [f for f in ("--compile", "--graphs") if f in flags and (f != "--graphs" or gpu)]
    for model, label in ((None, "embedded"), (pick_preset(device.get("memory_bytes"), smoke), None)):
        base = ["bench", "--backend", backend, *(["--model", model] if model else []), *size, "--json"]
        s.append(Stage(f"bench-{label or model}-eager", base, 240, 20, stdout_json=True))
        if step:
            s.append(Stage(f"bench-{label or model}-{step[-1][2:]}", base + step, 300, 30, stdout_json=True,
                           skip="smoke: the step comparison profiles each variant for minutes under the interpreter "
                                "and means nothing off a GPU" if smoke else ""))
    return s


def run_stage(stage: Stage, out_dir: Path, timeout_s: float, env: dict) -> dict:
    """Run one stage in its own process group; its outcome, never an exception (a crash is a result)."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{stage.name}.stdout.txt", logs / f"{stage.name}.stderr.txt"
    cmd = stage.command()
    res = {"stage": stage.name, "command": shlex.join(cmd), "timeout_s": round(timeout_s, 1),
           "logs": [str(out_path.relative_to(out_dir)), str(err_path.relative_to(out_dir))]}
    if stage.note:
        res["note"] = stage.note
    t0 = time.perf_counter()
    with open(out_path, "w") as fo, open(err_path, "w") as fe:
        try:
            proc = subprocess.Popen(cmd, cwd=out_dir, stdout=fo, stderr=fe, env={**env, **stage.env},
                                    start_new_session=True)
        except OSError as e:
            return {**res, "status": "error", "rc": None, "seconds": 0.0, "reason": f"cannot start: {e}"}
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            res.update(status="timeout", rc=None, reason=f"killed after {timeout_s:.0f} s")
            rc = None
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if rc is not None:
        res["rc"] = rc
        wrote = bool(stage.outputs) and all((out_dir / f).is_file() for f in stage.outputs)
        res["status"] = "pass" if rc == 0 else "fail" if rc == 1 and wrote else "error"  # fail: it ran and found faults
        if rc != 0:
            res["reason"] = _last_error(err_path, rc)
    res["files"] = [f for f in stage.outputs if (out_dir / f).is_file()]
    if stage.stdout_json:
        try:
            doc = json.loads(out_path.read_text())
            (out_dir / f"{stage.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
            res["files"].append(f"{stage.name}.json")
            res["result"] = doc
        except ValueError:
            pass
    for f in res["files"]:
        if f.endswith(".json"):
            res.setdefault("summary", {})[f] = _digest(out_dir / f)
    return res


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and anything it started
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _last_error(path: Path, rc: int) -> str:
    """The last meaningful stderr line, e.g. `RuntimeError: CUDA error: an illegal memory access`."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    sig = f" (signal {-rc}: {signal.Signals(-rc).name})" if rc < 0 and -rc in signal.Signals._value2member_map_ else ""
    return f"exit code {rc}{sig}" + (f": {lines[-1][:400]}" if lines else "")


def _digest(path: Path):
    """The part of a stage's JSON the summary needs: a conformance summary, or the file as is if small."""
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        return {"unreadable": str(e)}
    if isinstance(doc, dict) and doc.get("tool") == "deepport conformance":
        return {"summary": doc.get("summary"), "tier": doc.get("tier"), "label": doc.get("label")}
    return None


def run_stages(stages: list[Stage], out_dir: Path, budget_s: float, env: dict | None = None, echo=None) -> list[dict]:
    """Run `stages` in order within `budget_s` seconds; a stage that no longer fits is skipped with the reason."""
    env = {**os.environ, "DEEPPORT_PROGRESS": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
    t0, results = time.perf_counter(), []
    for st in stages:
        left = budget_s - (time.perf_counter() - t0)
        if st.skip:
            r = {"stage": st.name, "status": "skipped", "seconds": 0.0, "command": shlex.join(st.command()),
                 "reason": st.skip}
        elif left - st.reserve_s < st.min_s:
            kept = f", {st.reserve_s:.0f} s of it kept for the benchmarks after it" if st.reserve_s else ""
            r = {"stage": st.name, "status": "skipped", "seconds": 0.0, "command": shlex.join(st.command()),
                 "reason": f"budget: {max(left, 0):.0f} s of {budget_s:.0f} s left{kept}, the stage needs at least "
                           f"{st.min_s:.0f} s (raise --budget-s or pick --stages)"}
        else:
            r = run_stage(st, out_dir, min(st.timeout_s, left - st.reserve_s), env)
        results.append(r)
        if echo:
            echo(f"[{time.perf_counter() - t0:6.1f} s] {st.name}: {r['status']}"
                 + (f" ({r['reason']})" if r.get("reason") else ""))
    return results


def conformance_matrix(out_dir: Path, results: list[dict]) -> dict:
    """op -> column ("quick fp8", "full bf16", ...) -> {status: count} from the stages' conformance JSON."""
    matrix: dict = {}
    for r in results:
        for f in r.get("files", []):
            if not f.endswith(".json") or r["stage"].startswith(("bench", "backends")):
                continue
            try:
                doc = json.loads((out_dir / f).read_text())
            except ValueError:
                continue
            tier = "model" if r["stage"] == "model-check" else ("quick" if r["stage"] == "conformance-quick" else "full")
            for row in doc.get("results", []):
                col = f"{tier} {row.get('dtype') or '-'}"
                cell = matrix.setdefault(row["op"], {}).setdefault(col, {})
                cell[row["status"]] = cell.get(row["status"], 0) + 1
    return matrix


def anchors(out_dir: Path) -> list[dict]:
    path = out_dir / "bench-ops.json"
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        return []
    return [a for e in doc.get("ops", {}).values() for a in e.get("anchors", [])]


def e2e_rows(results: list[dict]) -> list[dict]:
    """One row per `deepport bench` run: the eager run's "plain" numbers, or each variant of a step comparison
    (eager / compiled / graphs: decode tok/s, speed-up over eager, tokens identical to eager)."""
    rows = []
    for r in results:
        if not r["stage"].startswith("bench-") or r["stage"] == "bench-ops":
            continue
        doc = r.get("result") if isinstance(r.get("result"), dict) else {}
        base = {"stage": r["stage"], "status": r["status"], "model": doc.get("model"), "dtype": doc.get("dtype")}
        variants = doc.get("step_compare") or {}
        if variants:
            rows += [{**base, "variant": name, "decode_tokens_per_s": v.get("decode_tokens_per_s"),
                      "prefill_tokens_per_s": None, "speedup_vs_eager": v.get("speedup_vs_eager"),
                      "tokens_equal_eager": v.get("tokens_equal_eager")} for name, v in variants.items()]
        else:
            plain = doc.get("plain") or {}
            rows.append({**base, "variant": "eager" if plain else None,
                         "decode_tokens_per_s": plain.get("decode_tokens_per_s"),
                         "prefill_tokens_per_s": plain.get("prefill_tokens_per_s"), "speedup_vs_eager": None,
                         "tokens_equal_eager": None})
    return rows


def _cell(counts: dict | None) -> str:
    if not counts:
        return ""
    order = [s for s in ("fail", "error", "fallback", "pass", "xfail", "skip") if s in counts]
    return " ".join(f"{counts[s]} {s}" for s in order) + " " + ("**FAIL**" if counts.get("fail") else "")


def summary_markdown(report: dict) -> str:
    d, meta = report["device"], report["meta"]
    f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"# deepport hardware report: {d.get('name')} ({d.get('label', '?')}), {meta['date']}", "",
             f"Command: `{meta['command']}`; budget {meta['budget_s']:.0f} s, used {meta['seconds']:.0f} s.", ""]
    if meta["smoke"] or d.get("interpreter"):
        lines += ["**Smoke / interpreter run: tiny shapes; every timing here is meaningless.**", ""]
    dev_keys = ("name", "capability", "gcn_arch", "memory_bytes", "driver", "cuda", "hip", "torch", "triton",
                "python", "deepport", "backend", "cpu")
    lines += ["| device | |", "|---|---|"] + [f"| {k} | {d[k]} |" for k in dev_keys if d.get(k) is not None] + [""]
    lines += ["## Stages", "", "| stage | status | seconds | detail |", "|---|---|---|---|"]
    for r in report["stages"]:
        detail = r.get("reason") or r.get("note") or ""
        for digest in (r.get("summary") or {}).values():
            if digest and digest.get("summary"):
                s = digest["summary"]
                detail = ", ".join(f"{s[k]} {k}" for k in ("pass", "fail", "fallback", "skip", "xfail") if s.get(k))
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} | {detail.replace('|', '/')[:300]} |")
    matrix = report["conformance_matrix"]
    if matrix:
        cols = sorted({c for row in matrix.values() for c in row},
                      key=lambda c: (("quick", "full", "model").index(c.split()[0]), c))
        lines += ["", "## Conformance (cases per status)", "", "| op | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        lines += [f"| {op} | " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for op, row in matrix.items()]
    if report["anchors"]:
        lines += ["", "## Targets (issue 14), from bench-ops.json", "", "| target | wanted | measured | met |",
                  "|---|---|---|---|"]
        from deepport.bench_ops import met_text

        for a in report["anchors"]:
            met = met_text(a)
            lines.append(f"| {a['name']} | >= {a['target']:g} | {f(a['value'], 2)} | {met} |")
        lines += ["", "Per-row numbers: bench-ops.md."]
    if report["e2e"]:
        lines += ["", "## End-to-end bench (`deepport bench`)", "", "| stage | status | model | dtype | variant | "
                  "decode tok/s | prefill tok/s | x eager | tokens = eager |", "|---|---|---|---|---|---|---|---|---|"]
        same = {True: "yes", False: "**no**", None: "-"}
        lines += [f"| {r['stage']} | {r['status']} | {r['model'] or '-'} | {r['dtype'] or '-'} | {r['variant'] or '-'} | "
                  f"{f(r['decode_tokens_per_s'])} | {f(r['prefill_tokens_per_s'])} | {f(r['speedup_vs_eager'], 2)} | "
                  f"{same[r['tokens_equal_eager']]} |" for r in report["e2e"]]
    return "\n".join(lines) + "\n"


def run_report(backend: str = "auto", budget_s: float = 480.0, output: str | Path = "docs/hardware",
               smoke: bool = False, only: list | None = None, extra_stages: list | None = None, echo=None,
               command: str | None = None) -> tuple[dict, Path]:
    """Detect, plan, run within the budget, write DIR/<device>-<date>/; returns (report, that directory)."""
    t0 = time.perf_counter()
    date = datetime.now(timezone.utc)
    device = _detect_in_subprocess(backend)
    name = slug(device.get("name") or "device") + ("-smoke" if smoke else "")
    out_dir = Path(output).resolve() / f"{name}-{date.strftime('%Y-%m-%d')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = plan(backend, smoke, device) + list(extra_stages or [])
    if only:
        unknown = [o for o in only if not any(st.name == o or st.name.startswith(o + "-") for st in stages)]
        if unknown:
            from deepport.core.errors import ConfigError

            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(st.name for st in stages)}")
        stages = [st for st in stages if any(st.name == o or st.name.startswith(o + "-") for o in only)]
    left = budget_s - (time.perf_counter() - t0)
    results = run_stages(stages, out_dir, left, echo=echo)
    report = {"schema_version": 1, "tool": "deepport hardware-report", "device": device,
              "meta": {"date": date.isoformat(timespec="seconds"), "budget_s": budget_s, "smoke": smoke,
                       "backend": backend, "command": command or "deepport hardware-report",
                       "timings": "meaningless (smoke shapes / interpreter)" if smoke or device.get("interpreter")
                       else "measured", "seconds": round(time.perf_counter() - t0, 1)},
              "stages": [{k: v for k, v in r.items() if k != "result"} for r in results],
              "conformance_matrix": conformance_matrix(out_dir, results), "anchors": anchors(out_dir),
              "e2e": e2e_rows(results)}
    report["counts"] = {s: sum(r["status"] == s for r in results) for s in STATUSES}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(report))
    return report, out_dir


def _detect_in_subprocess(backend: str) -> dict:
    """Detection in a child process, so the parent never holds a GPU context while the stages run."""
    cmd = [sys.executable, "-m", "deepport.hardware_report", "detect", "--backend", backend]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout)
    except (subprocess.TimeoutExpired, ValueError) as e:
        return {"name": cpu_model(), "detect_error": f"{type(e).__name__}: {e}", "backend": backend}


def cmd_hardware_report(a) -> int:
    only = [s.strip() for s in a.stages.split(",") if s.strip()] if a.stages else None
    argv = ["deepport", "hardware-report", "--backend", a.backend, "--budget-s", f"{a.budget_s:g}",
            "--output", str(a.output)] + (["--smoke"] if a.smoke else []) + (["--stages", a.stages] if a.stages else [])
    report, out_dir = run_report(a.backend, a.budget_s, a.output, a.smoke, only,
                                 echo=lambda s: print(s, file=sys.stderr, flush=True), command=shlex.join(argv))
    json_out.emit_json(report, a.json, indent=1, default=str)
    print((out_dir / "summary.md").read_text())
    print(f"wrote {out_dir}", file=sys.stderr)
    return 0 if report["counts"]["fail"] + report["counts"]["error"] + report["counts"]["timeout"] == 0 else 1


def register(sub) -> None:
    from deepport import cli_checks

    p = sub.add_parser("hardware-report", help="every hardware check in one command, within a time budget; "
                                               "writes DIR/<device>-<date>/")
    p.add_argument("--backend", default="auto", help="backend name (default: DEEPPORT_BACKEND, else auto)")
    p.add_argument("--budget-s", type=cli_checks.positive_float, default=480.0, help="seconds for all stages (default 480)")
    p.add_argument("--output", default="docs/hardware", help="parent directory of the report (default docs/hardware)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes everywhere (CI / interpreter); timings meaningless")
    p.add_argument("--stages", default=None, help="comma-separated stage names or prefixes (default: all), "
                                                  "e.g. backends,conformance-quick,full,bench-ops")
    json_out.add_json_argument(p, "the report (as DIR/<device>-<date>/report.json)")
    p.set_defaults(fn=cmd_hardware_report)


def _model_check_main(backend: str, json_path: str | None, dtypes=("fp8", "bf16"), steps: int = 8) -> int:
    """The end-to-end model check alone (no op cases), --fallback error, as a conformance report."""
    import torch

    from deepport.conformance import model_check
    from deepport.conformance import report as conformance_report
    from deepport.core import registry

    b = registry.get_backend(backend) if backend not in (None, "auto") else registry.select(backend)
    t0 = time.perf_counter()
    results = model_check.run(b, dtypes=tuple(dtypes), steps=steps, fallback="error")
    meta = {"dtypes": list(dtypes), "fallback": "error", "device": str(b.device()), "steps": steps,
            "versions": {"torch": torch.__version__, "triton": _version("triton"), "deepport": _version("deepport")},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t0, 3)}
    rep = conformance_report.Report(b.name, b.evidence_label(), "model", results, [], meta)
    conformance_report.print_table(rep)
    if json_path:
        conformance_report.write_json(rep, json_path)
    return rep.exit_code


def main(argv=None) -> int:
    """Internal entry points the report runs in subprocesses: `detect` and `model-check`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m deepport.hardware_report")
    ap.add_argument("what", choices=("detect", "model-check"))
    ap.add_argument("--backend", default="auto")
    json_out.add_json_argument(ap, "model-check: the conformance report")
    ap.add_argument("--dtypes", default="fp8,bf16", help="model-check: comma-separated dtypes")
    ap.add_argument("--steps", type=int, default=8, help="model-check: greedy / sampled steps")
    a = ap.parse_args(argv)
    with json_out.stdout_reserved(a.json):
        if a.what == "detect":  # its stdout is the JSON document, with or without --json
            json_out.emit_json(detect(a.backend), a.json or json_out.STDOUT, indent=None, default=str)
            return 0
        return _model_check_main(a.backend, a.json, [d for d in a.dtypes.split(",") if d], a.steps)


if __name__ == "__main__":
    sys.exit(main())
