"""The conformance suite core: cases, comparisons, policy, statuses, reports, CLI."""
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import replace

import pytest
import torch

from deepport import cli
from deepport.backends.cpu_ref import ops as ref
from deepport.conformance import compare as cmp
from deepport.conformance import policy, report
from deepport.conformance.case import TIERS
from deepport.conformance.cases import all_cases
from deepport.conformance.cli import LineProgress
from deepport.conformance.reference import expected
from deepport.conformance.runner import run
from deepport.conformance.tolerances import tolerance
from deepport.core import registry
from deepport.core.errors import BackendError, ConfigError
from deepport.core.ops import CONTRACTS

CPU_REF = registry.get_backend("cpu_ref")


def _backend(name, impls, toml=None, **kw):
    """A backend built in the test: cpu_ref's descriptor with its own op table and policy file."""
    return replace(CPU_REF, name=name, load=lambda: dict(impls), conformance_toml=toml, origin="test", **kw)


def _ref_impls():
    return {op: getattr(ref, op) for op in CONTRACTS if op != "linear"}


def test_cpu_ref_quick_passes_via_cli_and_reports_parse(tmp_path, capsys):
    j, x, m = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.md"
    rc = cli.main(["conformance", "--backend", "cpu_ref", "--tier", "quick", "--json", str(j), "--junit", str(x),
                   "--markdown", str(m)])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(j.read_text())
    assert data["schema_version"] == 1 and data["backend"] == "cpu_ref" and data["label"] == "reference"
    assert data["summary"]["fail"] == 0 and data["summary"]["pass"] == data["summary"]["total"] > 30
    assert {r["op"] for r in data["results"]} == set(CONTRACTS)
    assert set(data["results"][0]) >= {"op", "case", "dtype", "status", "impl", "max_abs", "max_rel", "rtol", "atol",
                                       "reason", "seconds"}
    assert data["versions"]["torch"] == torch.__version__
    root = ET.parse(x).getroot()
    assert root.tag == "testsuites" and int(root.get("failures")) == 0
    suites = root.findall("testsuite")
    assert {s.get("name") for s in suites} == set(CONTRACTS)
    assert sum(len(s.findall("testcase")) for s in suites) == data["summary"]["total"]
    rows = [ln for ln in m.read_text().splitlines() if ln.startswith("| ") and not ln.startswith("| op ")]
    assert {ln.split("|")[1].strip() for ln in rows} == set(CONTRACTS)
    assert "pass (composite)" in next(ln for ln in rows if ln.startswith("| linear "))
    assert "rms_norm_residual_bf16" in out and "0 fail" in out


@pytest.mark.parametrize("tier", TIERS)
def test_case_names_unique_and_well_formed(tier):
    cases = all_cases(tier)
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    for c in cases:
        assert re.fullmatch(rf"{c.op}_[a-z0-9_]+_{c.dtype}", c.name), c.name
        assert c.dtype in ("fp8", "bf16") and c.tier == tier
    assert {c.op for c in cases} == set(CONTRACTS), "every contract op needs cases in every tier"


def test_quick_inputs_are_seeded_and_never_all_zero():
    for c in all_cases("quick"):
        a, b = c.make(), c.make()
        for k, v in a.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.equal(v.float(), b[k].float()), f"{c.name}.{k} not reproducible"
                assert v.float().abs().sum() > 0, f"{c.name}.{k} is all zeros"


def test_attention_cases_use_the_yarn_softmax_scale():
    from deepport.core.config import preset

    scale = preset("v3-671b").softmax_scale
    assert scale > 1.5 * 192 ** -0.5
    for c in all_cases("quick", ops=["mla_prefill", "mla_decode"]):
        assert c.make()["scale"] == scale


def test_subtly_wrong_op_fails_exactly_that_op():
    impls = _ref_impls()
    impls["silu_mul"] = lambda x: (ref.silu_mul(x).float() * 1.03).to(x.dtype)  # 3% too large
    impls["silu_mul"].__name__ = "silu_mul"
    rep = run(_backend("subtle", impls), tier="quick")
    assert {r.op for r in rep.failed} == {"silu_mul"}
    assert all(r.status == "fail" for r in rep.results if r.op == "silu_mul")
    assert all(r.status == "pass" for r in rep.results if r.op != "silu_mul")
    assert rep.exit_code == 1
    assert "elements outside" in rep.failed[0].reason


def test_backend_exception_is_a_fail_not_a_crash():
    impls = _ref_impls()

    def rope(x, cos, sin):
        raise RuntimeError("kernel launch failed: no device")

    impls["rope"] = rope
    rep = run(_backend("crashy", impls), ops=["rope", "silu_mul"])
    assert {r.op for r in rep.failed} == {"rope"}
    assert "RuntimeError: kernel launch failed" in rep.failed[0].reason


def test_nan_output_fails_and_json_stays_strict(tmp_path):
    impls = _ref_impls()
    impls["silu_mul"] = lambda x: torch.full_like(x[..., : x.shape[-1] // 2], float("nan"))
    impls["silu_mul"].__name__ = "silu_mul"
    rep = run(_backend("nan", impls), ops=["silu_mul"])
    n = len(all_cases("quick", ["silu_mul"]))  # every silu_mul case, whatever its dtype
    assert n >= 2 and len(rep.failed) == n and all("got nan" in r.reason for r in rep.failed)
    report.write_json(rep, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["results"][0]["max_abs"] is None and data["summary"]["fail"] == n


def test_output_off_the_backend_device_fails():
    impls = _ref_impls()
    impls["silu_mul"] = lambda x: ref.silu_mul(x).to("meta")  # right math, wrong place
    impls["silu_mul"].__name__ = "silu_mul"
    rep = run(_backend("hosty", impls), ops=["silu_mul"])
    assert rep.failed and all("not on the backend's device cpu" in r.reason for r in rep.failed)


def test_list_prints_every_case_of_the_tier(capsys):
    assert cli.main(["conformance", "--list", "--tier", "full", "--ops", "moe_experts"]) == 0
    out = capsys.readouterr().out
    assert "moe_experts_v3_subset_fp8" in out and "16 of the 256 experts" in out


def test_fallback_is_reported_never_pass_and_error_policy_fails_missing_ops():
    impls = {"silu_mul": ref.silu_mul}
    rep = run(_backend("partial", impls), ops=["silu_mul", "rms_norm", "linear"])
    status = {(r.op, r.status, r.impl) for r in rep.results}
    assert ("silu_mul", "pass", "native") in status
    assert {s for op, s, _ in status if op == "rms_norm"} == {"fallback"}
    linear = {(r.dtype, r.status, r.impl) for r in rep.results if r.op == "linear"}
    assert linear == {("bf16", "pass", "composite"), ("fp8", "fallback", "composite")}  # fp8: act_quant + fp8_gemm
    assert rep.exit_code == 0
    strict = run(_backend("partial", impls), ops=["silu_mul", "rms_norm"], fallback="error")
    assert {r.op for r in strict.failed} == {"rms_norm"}
    assert "--fallback error" in strict.failed[0].reason
    assert all(r.status == "pass" for r in strict.results if r.op == "silu_mul")


def test_missing_dtype_is_skipped_with_reason():
    rep = run(_backend("bf16only", _ref_impls(), dtypes=frozenset({"bf16"})), ops=["fp8_gemm", "silu_mul"])
    skipped = [r for r in rep.results if r.status == "skip"]
    assert skipped and all(r.op == "fp8_gemm" for r in skipped)
    assert "does not support dtype fp8" in skipped[0].reason
    assert rep.exit_code == 0


def _toml(tmp_path, text):
    p = tmp_path / "conformance.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ('[[xfail]]\ncase = "rope_q_bf16"\n', "missing reason"),
    ('[[xfail]]\ncase = "rope_nope_bf16"\nreason = "x"\n', "matches no conformance case"),
    ('[[tolerance]]\nop = "flash"\nrtol = 1\nreason = "x"\n', "unknown op"),
    ('[[tolerance]]\nop = "rope"\nreason = "x"\n', "needs rtol and/or atol"),
    ('[[xfail]]\nop = "rope"\ncase = "rope_q_bf16"\nreason = "x"\n', "exactly one of"),
    ('[[skip]]\ncase = "rope_q_bf16"\nreason = "x"\n', "unknown table"),
    ('[[xfail]\n', "not valid TOML"),
])
def test_policy_errors_name_file_and_entry(tmp_path, text, message):
    path = _toml(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        run(_backend("strict", _ref_impls(), toml=path), ops=["rope"])
    assert str(path) in str(e.value)


def test_policy_xfail_and_tolerance_are_applied_and_listed(tmp_path):
    impls = _ref_impls()
    impls["silu_mul"] = lambda x: (ref.silu_mul(x).float() * 1.03).to(x.dtype)
    impls["silu_mul"].__name__ = "silu_mul"
    path = _toml(tmp_path, '[[xfail]]\ncase = "silu_mul_*_bf16"\nreason = "scaled output (issue 7)"\n'
                           '[[tolerance]]\nop = "rope"\nrtol = 0.05\natol = 0.001\nreason = "fp16 tables"\n')
    rep = run(_backend("loose", impls, toml=path), ops=["silu_mul", "rope"])
    assert rep.exit_code == 0
    assert {r.status for r in rep.results if r.op == "silu_mul"} == {"xfail"}
    assert all((r.rtol, r.atol) == (0.05, 0.001) for r in rep.results if r.op == "rope")
    assert [p["kind"] for p in rep.policy] == ["xfail", "tolerance"] and rep.policy[0]["reason"].startswith("scaled")
    buf = __import__("io").StringIO()
    report.print_table(rep, file=buf)
    assert "policy xfail: silu_mul_*_bf16" in buf.getvalue()
    assert "Policy entries" in report.matrix_markdown([rep])


def test_quant_codes_one_ulp_only_at_a_tie():
    case = all_cases("quick", ops=["act_quant"])[0]
    inputs = case.make()
    want = expected(case, inputs)
    codes, s = ref.act_quant(**inputs)
    tol = tolerance(case)
    assert cmp.compare(case, (codes, s), want, tol).ok
    bumped = codes.clone().view(torch.uint8)
    bumped.view(-1)[3] += 1  # one ulp away on an element that is not at a tie
    out = cmp.compare(case, (bumped.view(codes.dtype), s), want, tol)
    assert not out.ok and "codes: 1 of" in out.detail
    # an element exactly halfway between two fp8 values: either neighbour is accepted
    q = want.extra["quotient"].clone()
    lo = codes.float().view(-1)[3].item()
    hi = bumped.view(codes.dtype).float().view(-1)[3].item()
    q.view(-1)[3] = (lo + hi) / 2
    want.extra["quotient"] = q
    assert cmp.compare(case, (bumped.view(codes.dtype), s), want, tol).ok
    assert not cmp.compare(case, (codes, s * (1 + 2 ** -21)), want, tol).ok  # scales: one fp32 ulp at most


def test_routing_allows_a_different_set_only_at_a_near_tie():
    case = next(c for c in all_cases("quick", ops=["moe_gate"]) if "near_tie" in c.name)
    inputs = case.make()
    want = expected(case, inputs)
    w, ids = ref.moe_gate(**inputs)
    tol = tolerance(case)
    assert want.extra["tie_rows"][0] and not want.extra["tie_rows"][1:].any()
    biased = torch.sigmoid(inputs["x"].double() @ inputs["weight"].double().T) + inputs["bias"].double()
    for row in (0, 1):
        other = ids.clone()
        cand = [e for e in biased[row].argsort(descending=True).tolist() if e not in ids[row].tolist()]
        other[row, torch.argmin(biased[row, ids[row]])] = cand[0]  # swap the k-th for the runner-up
        assert cmp.compare(case, (w, other), want, tol).ok == (row == 0)
    assert not cmp.compare(case, (w * 1.001, ids), want, tol).ok


def test_sampling_is_checked_by_property():
    case = next(c for c in all_cases("quick", ops=["sample"]) if "nucleus" in c.name)
    inputs = case.make()
    want = expected(case, inputs)
    tok = ref.sample(**inputs)
    assert cmp.compare(case, tok, want, tolerance(case)).ok
    outside = (~want.extra["nucleus"][0]).nonzero()[0]
    tok[0] = outside
    assert not cmp.compare(case, tok, want, tolerance(case)).ok


def test_progress_is_silent_off_a_terminal_and_with_progress_0(monkeypatch, capsys):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setenv("DEEPPORT_PROGRESS", "1")
    p = LineProgress(tty)
    p(1, 2, "rope_q_bf16 pass")
    assert "[1/2" in tty.getvalue() and "rope_q_bf16" in tty.getvalue()
    monkeypatch.setenv("DEEPPORT_PROGRESS", "0")
    quiet = Tty()
    LineProgress(quiet)(1, 2, "x")
    assert quiet.getvalue() == ""
    monkeypatch.setenv("DEEPPORT_PROGRESS", "1")
    pipe = io.StringIO()
    LineProgress(pipe)(1, 2, "x")
    assert pipe.getvalue() == ""


def test_usage_errors_exit_2(capsys):
    assert cli.main(["conformance", "--backend", "nosuch"]) == 2
    assert "unknown backend 'nosuch'" in capsys.readouterr().err
    assert cli.main(["conformance", "--backend", "cpu_ref", "--ops", "rope,flash"]) == 2
    assert "unknown op(s) flash" in capsys.readouterr().err
    with pytest.raises(BackendError, match="unknown fallback policy"):
        run("cpu_ref", fallback="maybe")
    with pytest.raises(ConfigError, match="unknown cross-check"):
        run("cpu_ref", cross_check="tvm")


@pytest.mark.slow
def test_cpu_ref_full_tier_passes():
    rep = run("cpu_ref", tier="full")
    assert rep.exit_code == 0, [(r.case, r.reason) for r in rep.failed]
    assert {r.op for r in rep.results} == set(CONTRACTS)
