"""End-to-end model check: cpu_ref passes every check; a broken graph fails; missing capabilities skip."""
import pytest
import torch

from deepport.conformance import model_check
from deepport.core.registry import Backend, Probe
from planted import faults


def _by_case(results):
    return {r.case: r for r in results}


def test_cpu_ref_passes_every_check_bf16():
    res = _by_case(model_check.run("cpu_ref", dtypes=("bf16",), steps=4))
    assert set(res) == {f"model_{c}_bf16" for c in model_check.CHECKS}
    assert all(r.status == "pass" and r.op == "model" and r.impl == "native" for r in res.values()), res
    assert res["model_logits_bf16"].max_abs == 0.0  # the same graph on the same ops: bit-identical
    assert "greedy picks differ" in res["model_greedy_bf16"].reason


def test_rotate_half_rope_fails_the_graph():
    res = _by_case(model_check.run(faults.backend("rotatehalf"), dtypes=("bf16",), steps=4))
    assert res["model_logits_bf16"].status == "fail" and "cosine" in res["model_logits_bf16"].reason
    assert res["model_decode_bf16"].status == "fail"


def test_missing_dtype_skips_with_reason():
    b = Backend(name="bfonly", device_type="cpu", probe=lambda: Probe(True), load=dict, dtypes=frozenset({"bf16"}))
    res = model_check.run(b, dtypes=("fp8",))
    assert [r.status for r in res] == ["skip"] * len(model_check.CHECKS)
    assert "does not support dtype fp8" in res[0].reason


def test_compare_logits_thresholds():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(2, 5, 64, generator=g)
    th = model_check.THRESHOLDS["bf16"]
    assert model_check.compare_logits(ref + 1e-3 * torch.randn(ref.shape, generator=g), ref, th).ok
    assert not model_check.compare_logits(ref.flip(-1), ref, th).ok
    bad = ref.clone()
    bad[0, 0, 0] = float("nan")
    assert not model_check.compare_logits(bad, ref, th).ok
