"""`deepport bench ops` (deepport/bench_ops/): the one op-benchmark harness, in smoke mode under the interpreter
(its timings mean nothing; on a GPU the same rows carry do_bench / CUDA-graph timings)."""
import json

import pytest

from deepport import bench_ops
from deepport.cli import main


def _bench(tmp_path, ops):
    out, md = tmp_path / "ops.json", tmp_path / "ops.md"
    rc = main(["bench", "ops", "--backend", "cuda", "--smoke", "--op", ops, "--json", str(out), "--markdown", str(md)])
    return rc, json.loads(out.read_text()), md.read_text()


def test_fp8_gemm_and_mla_decode_rows(tmp_path):
    rc, rep, md = _bench(tmp_path, "fp8_gemm,mla_decode")
    assert rc == 0 and list(rep["ops"]) == ["fp8_gemm", "mla_decode"]
    assert rep["label"] == "interpreter" and rep["fp8_format"] == "e4m3fn" and not rep["timings_meaningful"]
    assert rep["limits"]["copy_gbs"] > 0 and rep["limits"]["bf16_tflops"] > 0
    gemm = rep["ops"]["fp8_gemm"]["rows"]
    assert [r["case"] for r in gemm] == ["smoke_ragged_n M=1", "smoke_ragged_n M=33"]
    for r in gemm:
        assert r["max_rel_err"] < 1e-2, r  # same codes as cpu_ref: only the summation order may differ
        assert r["kernel"]["ms"] > 0 and r["kernel"]["timer"] == "torch.utils.benchmark"
        assert r["baselines"]["bf16_matmul"]["rate"] > 0
        assert "sm90" in r["baselines"]["scaled_mm_blockwise"]["skipped"]  # blockwise _scaled_mm is sm90-only
        assert r["limit"]["rate"] > 0
    (dec,) = rep["ops"]["mla_decode"]["rows"]
    assert dec["shape"]["batch"] == 2 and dec["max_rel_err"] < 2e-2
    assert dec["limit"]["rate"] == rep["limits"]["copy_gbs"]
    assert "| smoke_ragged_n M=33 |" in md and "x vs bf16_matmul" in md and "of limit" in md
    assert "meaningless" in md and "| >= 0.7 | - | - |" in md  # no batch>=32 row in smoke: no anchor value


def test_moe_experts_rows_against_the_loop_and_the_dense_mlp(tmp_path):
    rc, rep, md = _bench(tmp_path, "moe_experts")
    assert rc == 0
    e = rep["ops"]["moe_experts"]
    assert [r["case"] for r in e["rows"]] == ["fp8 M=1", "fp8 M=9", "bf16 M=1", "bf16 M=9"]
    for r in e["rows"]:
        assert r["max_rel_err"] < 2e-2, r
        assert set(r["baselines"]) == {"per_expert_loop", "bf16_dense_equivalent"}
        assert all(b["ms"] > 0 for b in r["baselines"].values())
    (anchor,) = e["anchors"]
    assert anchor["value"] is not None and anchor["meaningful"] is False
    assert "n/a (timings meaningless)" in md  # a smoke speed-up is never judged against the target


def test_per_expert_loop_matches_cpu_ref():
    """The unfused baseline computes what the fused op computes (else its timing compares different work)."""
    import torch

    from deepport.backends.cpu_ref import ops as ref
    from deepport.bench_ops.moe_experts import make_experts, per_expert_loop, _expert
    from deepport.core import registry

    table = registry.bind(registry.get_backend("cpu_ref"), fallback="error")
    gen = torch.Generator().manual_seed(3)
    ws = make_experts(4, 64, 32, "bf16", None, torch.device("cpu"), gen)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=gen)
    got = per_expert_loop(table, x, weights, ids, [tuple(_expert(w, e) for w in ws) for e in range(4)])
    want = ref.moe_experts(x, weights, ids, *ws)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_an_op_that_raises_is_recorded_and_the_others_run(monkeypatch, tmp_path):
    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield  # a generator, like the real rows()

    monkeypatch.setattr(bench_ops.op_module("mla_decode"), "rows", broken)
    rc, rep, md = _bench(tmp_path, "mla_decode,fp8_gemm")
    assert rc == 1  # an op that raised fails the command ...
    assert "illegal memory access" in rep["ops"]["mla_decode"]["error"]
    assert "Traceback" in rep["ops"]["mla_decode"]["traceback"]
    assert len(rep["ops"]["fp8_gemm"]["rows"]) == 2  # ... after the other ops ran
    assert "**Error**: `RuntimeError: CUDA error" in md


def test_unknown_op_is_refused_with_the_known_ones():
    from deepport.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown op benchmark.*fp8_gemm, mla_decode, moe_experts"):
        bench_ops.run("cuda", ["fp8_gem"], smoke=True)
