"""pytest integration: `pytest --deepport-backend NAME --pyargs deepport.conformance.suite`.

Loaded through the `pytest11` entry point (or `-p deepport.conformance.pytest_plugin`) and inert unless
--deepport-backend is given. Then the conformance cases become parametrized tests (ids = case names,
one mark per op) judged exactly as `deepport conformance` judges them (runner.run_case, the backend's
conformance.toml). Outcomes: pass -> passed; fail -> failed; xfail -> xfailed; skip -> skipped with the
reason; fallback -> skipped with "fallback: ..." (cpu_ref's code ran, so the backend was not tested).
"""
from __future__ import annotations

import pytest

FIXTURE = "deepport_case"


def pytest_addoption(parser):
    g = parser.getgroup("deepport", "deepport conformance (inert without --deepport-backend)")
    g.addoption("--deepport-backend", default=None, metavar="NAME",
                help="run the deepport conformance cases on backend NAME")
    g.addoption("--deepport-tier", default="quick", choices=("quick", "full"),
                help="quick: small shapes; full: DeepSeek-V3's real dims (default quick)")
    g.addoption("--deepport-dtype", default="all", choices=("fp8", "bf16", "all"), help="case dtypes (default all)")
    g.addoption("--deepport-fallback", default="reference", choices=("reference", "error"),
                help="ops the backend lacks: run cpu_ref's code and report fallback (reference) or fail (error)")
    g.addoption("--deepport-ops", default=None, metavar="OPS", help="comma-separated op names (default: every op)")
    g.addoption("--deepport-model-check", action="store_true",
                help="add the end-to-end checks on the embedded tiny checkpoint (tests model_<check>_<dtype>)")


def _active(config) -> bool:
    return bool(config.getoption("--deepport-backend", default=None))


def pytest_configure(config):
    if not _active(config):
        return  # inert: nothing imported, nothing registered
    from deepport.core.ops import CONTRACTS

    for op in CONTRACTS:
        config.addinivalue_line("markers", f"{op}: deepport conformance cases of the {op} op contract")
    config.addinivalue_line("markers", "model: deepport end-to-end model checks (--deepport-model-check)")
    from deepport.core import registry
    from deepport.core.errors import DeepportError

    name = config.getoption("--deepport-backend")
    try:
        b = registry.get_backend(name)
    except DeepportError as e:
        raise pytest.UsageError(str(e)) from None
    probe = registry.safe_probe(b)
    if not probe.available:
        raise pytest.UsageError(f"backend {name!r} is not available here: {probe.reason}; "
                                f"run `deepport backends` to see what is")
    config._deepport = _Session(config, b)


def pytest_report_header(config):
    s = getattr(config, "_deepport", None)
    if s is not None:
        return (f"deepport conformance: backend {s.backend.name} ({s.backend.evidence_label()}), tier {s.tier}, "
                f"dtypes {','.join(s.dtypes)}, fallback {s.fallback}")
    return None


def pytest_generate_tests(metafunc):
    if FIXTURE not in metafunc.fixturenames:
        return
    s = getattr(metafunc.config, "_deepport", None)
    if s is None:
        metafunc.parametrize(FIXTURE, [pytest.param(None, marks=pytest.mark.skip(
            reason="pass --deepport-backend NAME to run the deepport conformance cases"))], ids=["inactive"])
        return
    params = [pytest.param(c, id=c.name, marks=getattr(pytest.mark, c.op)) for c in s.cases + s.model_cases]
    metafunc.parametrize(FIXTURE, params)


class ModelCase:
    """One end-to-end check of deepport.conformance.model_check, as a parametrized case."""

    op = "model"

    def __init__(self, check: str, dtype: str):
        self.name, self.dtype = f"model_{check}_{dtype}", dtype


class _Session:
    """The options, the cases, the backend's policy, and one bound op table per dtype (bound lazily)."""

    def __init__(self, config, backend):
        from deepport.conformance.cases import all_cases, case_names
        from deepport.conformance import policy
        from deepport.core.errors import DeepportError

        self.backend = backend
        self.tier = config.getoption("--deepport-tier")
        d = config.getoption("--deepport-dtype")
        self.dtypes = ("fp8", "bf16") if d == "all" else (d,)
        self.fallback = config.getoption("--deepport-fallback")
        ops = config.getoption("--deepport-ops")
        ops = [o.strip() for o in ops.split(",") if o.strip()] if ops else None
        try:
            self.cases = all_cases(self.tier, ops, self.dtypes)
            self.policy = policy.load(backend.conformance_toml, case_names())
        except DeepportError as e:
            raise pytest.UsageError(str(e)) from None
        self.tables: dict[str, tuple] = {}
        self.model_cases, self.model_results = [], None
        if config.getoption("--deepport-model-check"):
            from deepport.conformance.model_check import CHECKS

            self.model_cases = [ModelCase(c, d) for d in self.dtypes for c in CHECKS]

    def table(self, dtype: str):
        """(skip reason or None, table, {op: refusal}) for `dtype`, bound once."""
        from deepport.conformance import runner

        if dtype not in self.tables:
            skip = runner._dtype_skip(self.backend, dtype)
            self.tables[dtype] = (skip, None, {}) if skip else (None, *runner._bind(self.backend, self.fallback))
        return self.tables[dtype]

    def run(self, case):
        if isinstance(case, ModelCase):  # the model is loaded once per dtype: run every check on first use
            if self.model_results is None:
                from deepport.conformance import model_check

                self.model_results = {r.case: r for r in model_check.run(
                    self.backend, dtypes=self.dtypes, fallback=self.fallback)}
            return self.model_results[case.name]
        from deepport.conformance import runner
        from deepport.conformance.report import CaseResult
        from deepport.conformance.tolerances import tolerance

        skip, table, refused = self.table(case.dtype)
        if skip:
            return CaseResult(case.op, case.name, case.dtype, "skip", "", reason=skip)
        fmt = table.fp8.name if table.fp8 else "e4m3fn"
        tol = tolerance(case, self.policy.overrides(case))
        return runner.run_case(case, table, fmt, tol, self.policy.xfail_reason(case), refused.get(case.op))


def _numbers(r) -> str:
    f = lambda v: "-" if v is None else f"{v:.3e}"  # noqa: E731
    return f"max abs {f(r.max_abs)}, max rel {f(r.max_rel)} (rtol {f(r.rtol)}, atol {f(r.atol)}), impl {r.impl or '-'}"


@pytest.fixture
def deepport_judge(request, record_property):
    """A function that runs a case on the backend and turns its status into this test's outcome."""

    def judge(case):
        r = request.config._deepport.run(case)
        for k in ("status", "impl", "max_abs", "max_rel", "rtol", "atol"):
            record_property(k, getattr(r, k))
        if r.status == "skip":
            pytest.skip(r.reason)
        if r.status == "fallback":
            pytest.skip(f"fallback: the backend lacks {case.op}; cpu_ref's code ran and passed ({_numbers(r)})")
        if r.status == "xfail":
            pytest.xfail(r.reason)
        if r.status == "fail":
            pytest.fail(f"{case.name}: {r.reason}\n{_numbers(r)}", pytrace=False)
        return r

    return judge
