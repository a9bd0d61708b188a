"""The onnxruntime cross-check: every quick-tier op passes, and a deliberately wrong ONNX function fails."""
import pytest

pytest.importorskip("onnxruntime")

from deepport.onnx import cross_check, functions  # noqa: E402
from deepport.onnx.functions import Body  # noqa: E402


def _skippable(r) -> bool:
    """temperature > 0: no ONNX replay of torch.Generator's draws (every such sample case, whatever its name)."""
    return r.op == "sample" and "temperature > 0" in r.reason


def test_every_quick_case_passes_or_is_skipped_with_a_reason():
    results = cross_check.run(tier="quick")
    ops = {r.op for r in results}
    assert ops == set(functions.CONTRACT_FUNCTIONS)  # every contract is covered
    bad = [(r.case, r.status, r.reason) for r in results
           if not (r.status == "pass" or (r.status == "skip" and _skippable(r)))]
    assert not bad
    assert all(r.impl == "onnxruntime" for r in results if r.status == "pass")
    assert any(r.op == "sample" and r.status == "pass" for r in results)  # the greedy case is checked


def _swapped_silu_mul():
    """silu applied to the wrong half: silu(x[..., I:]) * x[..., :I]."""
    b = Body("silu_mul", ["x"], ["y"])
    u, g = b("Split", b.f32("x"), axis=-1, num_outputs=2, outs=2)
    b("CastLike", b("Mul", b("Mul", g, b("Sigmoid", g)), u), "x", outs=["y"])
    return b.proto()


def _rope_rotate_half():
    """rotate-half pairing (x[i], x[i + R/2]) instead of DeepSeek's interleaved pairs."""
    b = Body("rope", ["x", "cos", "sin"], ["out"])
    x0, x1 = b("Split", b.f32("x"), axis=-1, num_outputs=2, outs=2)
    c, s = b("Unsqueeze", b.f32("cos"), b.ints(-2)), b("Unsqueeze", b.f32("sin"), b.ints(-2))
    out = b("Concat", b("Sub", b("Mul", x0, c), b("Mul", x1, s)), b("Add", b("Mul", x0, s), b("Mul", x1, c)), axis=-1)
    b("CastLike", out, "x", outs=["out"])
    return b.proto()


@pytest.mark.parametrize("op,wrong", [("silu_mul", _swapped_silu_mul), ("rope", _rope_rotate_half)])
def test_a_wrong_onnx_function_fails_the_cross_check(op, wrong):
    results = cross_check.run(tier="quick", dtypes=("bf16",), ops=[op], overrides={op: wrong()})
    assert results and all(r.status == "fail" for r in results)
    assert all("outside rtol" in r.reason for r in results)
    fixed = cross_check.run(tier="quick", dtypes=("bf16",), ops=[op])
    assert all(r.status == "pass" for r in fixed)


def test_conformance_cli_maps_cross_check_onnxruntime(capsys):
    from deepport.cli import main

    rc = main(["conformance", "--backend", "cpu_ref", "--ops", "silu_mul,rope", "--cross-check", "onnxruntime"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "silu_mul_tokens_bf16@onnxruntime" in out and "rope_q_bf16@onnxruntime" in out


def test_fp8_cases_pass_in_e4m3fnuz_too():
    results = cross_check.run(tier="quick", dtypes=("fp8",), fp8_format="e4m3fnuz")
    bad = [(r.case, r.reason) for r in results if r.status != "pass"]
    assert results and not bad, bad
    assert all(r.case.endswith("@onnxruntime:e4m3fnuz") for r in results)
