"""The conformance suite's teeth (issue 15): each planted fault below passes every case that predates the cases
added for it, and fails on those cases; the planted *correct* variant passes everything it touches.

Faults live in tests/planted/faults.py and reach deepport through the real entry-point path.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepport.conformance import compare, runner
from deepport.conformance.cases import all_cases
from deepport.conformance.cases.sample import BOUNDARY_P, BOUNDARY_TOP_P
from deepport.conformance.tolerances import SAMPLE_ALPHA
from planted import DIST, faults, install

# variants added for issue 15 (the distribution case is judged by chi-square since then)
NEW = ("large_scores", "splits", "tiny_rows", "huge_rows", "fp32in", "fp32out", "boundary", "temperature_only",
       "seeded", "distribution", "ties")

# fault -> the case(s) that must catch it
CAUGHT_BY = {
    "prefillnomax": {"mla_prefill_large_scores_bf16", "mla_prefill_large_scores_fp32in_bf16"},
    "prefillmax0": {"mla_prefill_large_scores_bf16", "mla_prefill_large_scores_fp32in_bf16"},
    "prefillbf16": {"mla_prefill_large_scores_fp32in_bf16"},
    "decodemerge": {"mla_decode_splits_bf16", "mla_decode_splits_mtp_bf16"},
    "decodebf16": {"mla_decode_large_scores_fp32in_bf16"},
    "normepsout": {"rms_norm_tiny_rows_bf16"},
    "normfp16sq": {"rms_norm_huge_rows_bf16"},
    "gemmfp32bf16": {"fp8_gemm_fp32out_fp8"},
    "dequantfp32bf16": {"weight_dequant_fp32out_fp8"},
    "nucleusshort": {"sample_boundary_bf16"},
    "tempignored": {"sample_temperature_only_bf16"},
    "globalrng": {"sample_seeded_bf16"},
    "fixedseed": {"sample_seeded_bf16"},
}  # decodechunk (faults.py) is the model check's: the op-level mla_decode_chunk case already fails it


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    path = install(tmp_path_factory.mktemp("planted") / "site")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(path))
        yield path
    sys.modules.pop(DIST, None)  # the next module's install imports its own copy


def test_every_new_fault_is_listed():
    assert set(CAUGHT_BY) <= set(faults.FAULTS)


@pytest.mark.parametrize("fault", list(CAUGHT_BY))
def test_fault_fails_only_the_cases_added_for_it(site, fault):
    op = faults.FAULTS[fault][0]
    rep = runner.run(f"planted_{fault}", tier="quick", ops=[op])
    failed = {r.case for r in rep.failed}
    assert rep.exit_code == 1 and CAUGHT_BY[fault] <= failed, [(r.case, r.status, r.reason) for r in rep.results]
    old = {r.case for r in rep.results if not any(v in r.case for v in NEW)}
    assert old, "no case predating issue 15 ran"
    assert not failed & old, f"cases that predate issue 15 fail too: {sorted(failed & old)}"
    assert all(" raised " not in r.reason for r in rep.failed)  # caught by the numbers, not by a crash


def test_reciprocal_act_quant_is_correct_and_passes_linear(site):
    # it flips codes by one ulp at fp32 ties (act_quant allows that); fp8 linear must not fail for it
    rep = runner.run("planted_ok_reciprocal", tier="quick", ops=["act_quant", "linear", "fp8_gemm"])
    assert rep.exit_code == 0, [(r.case, r.reason) for r in rep.failed]
    ties = next(r for r in rep.results if r.case == "act_quant_ties_fp8")
    assert ties.status == "pass" and ties.max_abs > 0  # codes did flip, and were allowed to
    assert {r.impl for r in rep.results if r.op == "act_quant"} == {"native"}


def test_linear_still_fails_a_wrong_act_quant(site):
    # judging linear on the backend's own codes only applies to codes act_quant's contract accepts
    rep = runner.run("planted_scaleulp", tier="quick", ops=["act_quant", "linear"], dtypes=("fp8",))
    assert {r.op for r in rep.failed} == {"act_quant", "linear"}


def test_boundary_case_power_is_one():
    # a nucleus one token short never draws the boundary token: the statistic is at least N * q_b whatever the
    # draws, and that alone is far past the alpha cut
    c = next(c for c in all_cases("quick", ["sample"]) if c.name == "sample_boundary_bf16")
    inputs = c.make()
    n = inputs["logits"].shape[0]
    p = torch.tensor(BOUNDARY_P, dtype=torch.float64)
    kept = p[(p.cumsum(0) - p) < BOUNDARY_TOP_P]
    q_b = float(kept[-1] / kept.sum())
    order = torch.argsort(torch.softmax(inputs["logits"][0].double() / inputs["temperature"], -1), descending=True)
    nucleus = torch.zeros(p.numel(), dtype=torch.float64)
    nucleus[order[:kept.numel()]] = kept / kept.sum()
    short = nucleus.clone()
    short[order[kept.numel() - 1]] = 0
    short /= short.sum()
    draws = torch.multinomial(short, n, replacement=True, generator=torch.Generator().manual_seed(0))
    stat, df, pval = compare.chi_square(draws, nucleus)
    assert stat >= n * q_b > 250 and pval < SAMPLE_ALPHA
    # and the correct distribution passes at the same N for many seeds (false-fail rate: alpha per seed)
    for seed in range(20):
        ok = torch.multinomial(nucleus, n, replacement=True, generator=torch.Generator().manual_seed(seed))
        assert compare.chi_square(ok, nucleus)[2] >= SAMPLE_ALPHA


@pytest.mark.slow
def test_model_check_runs_chunked_prefill_and_sampled_decoding(site):
    from deepport.conformance import model_check

    # a decode kernel that masks nothing once S > 2: only the chunked-prefill check (5 and 7 tokens) sees it
    res = {r.case: r for r in model_check.run("planted_decodechunk", dtypes=("bf16",))}
    assert {c for c, r in res.items() if r.status == "fail"} == {"model_chunked_bf16"}, res
    # a sampler on the global RNG: only the sampled-decoding check sees it, as a reproducibility failure
    res = {r.case: r for r in model_check.run("planted_globalrng", dtypes=("bf16",))}
    assert {c for c, r in res.items() if r.status == "fail"} == {"model_sampled_bf16"}, res
    assert "same seed drew other tokens" in res["model_sampled_bf16"].reason


def _torchrun_conformance(tmp_path, backend, site):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    out = tmp_path / f"{backend}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPPORT_PROGRESS": "0", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "deepport", "conformance",
                        "--backend", backend, "--ops", "all_reduce,all_to_all", "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    rep = json.loads(out.read_text()) if out.exists() else None
    return p, rep


@pytest.mark.slow
def test_collectives_across_two_ranks(site, tmp_path):
    p, rep = _torchrun_conformance(tmp_path, "cpu_ref", site)
    assert p.returncode == 0 and rep, p.stdout[-2000:] + p.stderr[-2000:]
    assert {r["case"]: r["status"] for r in rep["results"]} == {
        "all_reduce_ranks_bf16": "pass", "all_reduce_ranks_fp32_bf16": "pass",
        "all_to_all_ranks_uneven_bf16": "pass", "all_to_all_ranks_uneven_fp8": "pass"}
    # faults invisible at world size 1 (both are the identity there) fail across ranks
    for fault, op in (("reducemean", "all_reduce"), ("a2areversed", "all_to_all")):
        assert runner.run(f"planted_{fault}", tier="quick", ops=[op]).exit_code == 0
        p, rep = _torchrun_conformance(tmp_path, f"planted_{fault}", site)
        assert p.returncode == 1 and rep, p.stdout[-2000:] + p.stderr[-2000:]
        failed = {r["case"] for r in rep["results"] if r["status"] == "fail"}
        assert failed and all(c.startswith(op) for c in failed), failed
