"""Run the conformance cases on a backend: bind once per dtype, run each op on the backend's device, judge."""
from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from importlib import metadata

import torch

from deepport.conformance import policy as policy_mod
from deepport.conformance.case import CASE_DTYPES, to_device
from deepport.conformance.cases import all_cases, case_names
from deepport.conformance.compare import Outcome, compare
from deepport.conformance.reference import expected, on_codes
from deepport.conformance.report import CaseResult, Report
from deepport.conformance.tolerances import tolerance
from deepport.core import registry
from deepport.core.errors import BackendError, ConfigError
from deepport.core.registry import Backend


def _to_cpu(out):
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu")
    if isinstance(out, (tuple, list)):
        return tuple(_to_cpu(o) for o in out)
    return out


def _misplaced(out, device: torch.device) -> str:
    """Why an op's output is not on the backend's device ("" when it is): a silent host round trip is a fail."""
    for i, o in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
        if isinstance(o, torch.Tensor) and o.device.type != device.type:
            return f"output {i} is on {o.device}, not on the backend's device {device}; return device tensors"
    return ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _dtype_skip(b: Backend, dtype: str) -> str | None:
    """Why backend b cannot run `dtype` cases here (None when it can)."""
    try:
        registry.check_dtype(b, dtype)
    except BackendError as e:
        served = served_as(b)
        return f"{e}; FP8 checkpoints are served as {served} here" if dtype == "fp8" and served else str(e)
    return None


def served_as(b: Backend) -> str | None:
    """The dtype an FP8 checkpoint is served as on b (dequantised once at load) when b has no fp8; else None."""
    if "fp8" in b.dtypes or b.compute_dtype is None:
        return None
    return b.compute_dtype()


def _bind(b: Backend, fallback: str):
    """(table, {op: why it may not run}). With fallback="error" a missing op fails with the registry's message."""
    if fallback == "reference":
        return registry.bind(b, "reference"), {}
    try:
        return registry.bind(b, "error"), {}
    except BackendError as e:
        table = registry.bind(b, "reference")
        return table, {op: str(e) for op, how in table.report.items() if how == "fallback"}


def _judge(case, got, want, tol) -> Outcome:
    try:
        return compare(case, got, want, tol)
    except Exception as e:  # an output compare cannot even read is the backend's failure, reported as such
        return Outcome(False, detail=f"could not compare the output: {type(e).__name__}: {e}")


# Primitives a composite calls, per case dtype: a composite over a fallback primitive is itself a fallback.
COMPOSITE_PRIMITIVES = {"linear": {"fp8": ("act_quant", "fp8_gemm"), "bf16": ()}}


def _fallback_under(case, table) -> list[str]:
    if table.report.get(case.op) != "composite":
        return []
    return [p for p in COMPOSITE_PRIMITIVES.get(case.op, {}).get(case.dtype, ()) if table.report.get(p) == "fallback"]


def _regenerators(g: torch.Generator) -> tuple:
    """A fresh generator with g's seed (g has drawn by now) and one with another seed, on g's device."""
    seed = g.initial_seed()
    return (torch.Generator(device=g.device).manual_seed(seed),
            torch.Generator(device=g.device).manual_seed((seed + 0x9E3779B9) % 2**63))


def run_case(case, table, fmt_name: str, tol, xfail: str | None, refused: str | None) -> CaseResult:
    """Run one case on a bound table; never raises (an exception in the backend is a `fail`)."""
    impl = table.report.get(case.op, "")
    via_fallback = _fallback_under(case, table)
    res = CaseResult(case.op, case.name, case.dtype, "fail", impl, rtol=tol.rtol, atol=tol.atol)
    t0 = time.perf_counter()
    if refused:
        res.reason = refused
        return res
    try:
        inputs = case.make(device="cpu", fp8_format=fmt_name)
        want = expected(case, inputs)
        if case.op == "linear" and case.dtype == "fp8":  # judged on the backend's own (contract-valid) codes
            want = on_codes(case, inputs, want, lambda x, **kw: table.act_quant(to_device(x, table.device), **kw))
    except Exception as e:  # a suite bug must not take the run down; it still fails loudly
        res.reason = f"building the case or its reference failed: {type(e).__name__}: {e}"
        return res
    try:
        dev_inputs = {k: to_device(v, table.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = getattr(table, case.op)(**dev_inputs)
            if case.compare == "seeded":  # the same seed must redraw the same tokens, another seed other ones
                out = (out, *(getattr(table, case.op)(**dict(dev_inputs, generator=g))
                              for g in _regenerators(dev_inputs["generator"])))
        misplaced = _misplaced(out, table.device)
        got = None if misplaced else _to_cpu(out)
    except Exception as e:
        outcome = Outcome(False, detail=f"{case.op} raised {type(e).__name__}: {e}")
    else:
        outcome = Outcome(False, detail=misplaced) if misplaced else _judge(case, got, want, tol)
    res.seconds = time.perf_counter() - t0
    res.max_abs, res.max_rel = outcome.max_abs, outcome.max_rel
    if outcome.ok:
        res.status = "fallback" if impl == "fallback" or via_fallback else "pass"
        res.reason = outcome.detail
        if via_fallback:
            res.reason = f"composite over cpu_ref fallback primitive(s): {', '.join(via_fallback)}"
        if xfail:
            res.reason = f"passes although conformance.toml marks it xfail ({xfail}); remove the entry"
    elif xfail:
        res.status, res.reason = "xfail", f"{xfail} [{outcome.detail}]"
    else:
        res.reason = outcome.detail
    return res


def run(backend: str | Backend, *, tier: str = "quick", dtypes=("fp8", "bf16"), ops=None,
        fallback: str = "reference", progress=None, model_check: bool = False, cross_check: str | None = None,
        parallel: tuple[int, int] = (1, 1)) -> Report:
    """Run the `tier` cases of `ops` (default: all) for `dtypes` on `backend` and return the Report.

    progress: optional callable progress(done, total, text) called after each case.
    model_check: also run deepport.conformance.model_check (end-to-end checks on the tiny checkpoint).
    cross_check: "onnxruntime" also runs deepport.onnx.cross_check.
    parallel: (tp, ep) for the model check under torchrun (docs/parallel.md).
    Raises BackendError/ConfigError (CLI exit 2) for an unknown or unavailable backend, an unknown tier,
    op, dtype or fallback policy, or an invalid conformance.toml.
    """
    b = registry.get_backend(backend) if isinstance(backend, str) else backend
    if fallback not in ("reference", "error"):
        raise BackendError(f"unknown fallback policy {fallback!r}; use 'reference' or 'error'")
    probe = registry.safe_probe(b)
    if not probe.available:
        raise BackendError(f"backend {b.name!r} is not available here: {probe.reason}; "
                           f"run `deepport backends` to see what is")
    if cross_check not in (None, "onnxruntime"):
        raise ConfigError(f"unknown cross-check {cross_check!r}; the one available is 'onnxruntime'")
    dtypes = tuple(dtypes)
    # fp32 has no op cases of its own (the bf16 cases' fp32-input variants cover fp32 arithmetic); it names
    # the end-to-end model check in fp32
    cases = all_cases(tier, ops, tuple(d for d in dtypes if d in CASE_DTYPES))
    pol = policy_mod.load(b.conformance_toml, case_names())
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    results: list[CaseResult] = []
    fmt = None
    sources: dict[str, str] = {}
    for dtype in dtypes:
        todo = [c for c in cases if c.dtype == dtype]
        skip = _dtype_skip(b, dtype)
        if skip:
            results += [CaseResult(c.op, c.name, c.dtype, "skip", "", reason=skip) for c in todo]
            continue
        table, refused = _bind(b, fallback)
        sources.update(table.sources)
        fmt = table.fp8
        for c in todo:
            tol = tolerance(c, pol.overrides(c))
            results.append(run_case(c, table, fmt.name if fmt else "e4m3fn", tol, pol.xfail_reason(c), refused.get(c.op)))
            if progress:
                progress(len(results), len(cases), f"{c.name} {results[-1].status}")
    order = {c.name: i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order[r.case])
    if model_check:
        results += _model_check(b, dtypes, fallback, _Steps(progress, len(results)), parallel)
    if cross_check:
        results += _cross_check(cross_check, tier, dtypes, ops, _Steps(progress, len(results)))
    meta = {"dtypes": list(dtypes), "fallback": fallback, "device": str(b.device()),
            "fp8_format": fmt.name if fmt else None, "ops": list(ops) if ops else None,
            "parallel": {"tp": parallel[0], "ep": parallel[1]}, "torch_threads": torch.get_num_threads(),
            "sources": sources,
            "fp8_checkpoints_served_as": served_as(b),
            "versions": {"deepport": _version("deepport"), "python": platform.python_version(),
                         "torch": torch.__version__, "triton": _version("triton")},
            "created": started.isoformat(timespec="seconds"), "seconds": round(time.perf_counter() - t0, 3)}
    return Report(b.name, b.evidence_label(), tier, results, pol.as_list(), meta)


class _Steps:
    """Progress for the add-on checks: they report `progress(text)` (or the full form); count on from `done`."""

    def __init__(self, progress, done: int):
        self.progress, self.done = progress, done

    def __call__(self, *args) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.done, str(args[-1]))


def _model_check(b, dtypes, fallback, progress, parallel=(1, 1)) -> list[CaseResult]:
    try:
        from deepport.conformance import model_check
    except ImportError as e:
        if e.name != "deepport.conformance.model_check":
            raise
        raise ConfigError("--model-check needs deepport/conformance/model_check.py, which this installation "
                          "lacks; update deepport or drop --model-check") from None
    return list(model_check.run(b, dtypes=dtypes, progress=progress, fallback=fallback, tp=parallel[0], ep=parallel[1]))


def _cross_check(kind, tier, dtypes, ops, progress) -> list[CaseResult]:
    if kind != "onnxruntime":
        raise ConfigError(f"unknown cross-check {kind!r}; the one available is 'onnxruntime'")
    try:
        from deepport.onnx import cross_check
    except ImportError as e:
        if not (e.name or "").startswith(("deepport.onnx", "onnx")):
            raise
        raise ConfigError(f"--cross-check onnxruntime needs deepport.onnx.cross_check and the onnx extra "
                          f"({e.name} is missing); pip install 'deepport[onnx]'") from None
    case_dtypes = tuple(d for d in dtypes if d in CASE_DTYPES)  # fp32 is the model check's only
    return list(cross_check.run(tier=tier, dtypes=case_dtypes, ops=ops, progress=progress))

