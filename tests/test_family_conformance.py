"""The conformance cases of issue 16 have teeth: a backend that ignores scale_fmt "ue8m0" (DeepSeek-V3.1) or
norm_topk_prob=false, or rounds ue8m0 scales the wrong way, fails exactly those cases."""
from dataclasses import replace

import pytest
import torch

from deepport.backends.cpu_ref import ops as ref
from deepport.conformance.runner import run
from deepport.core import registry
from deepport.core.formats import AMAX_FLOOR
from deepport.core.ops import CONTRACTS

CPU_REF = registry.get_backend("cpu_ref")


def _backend(name, **faulty):
    impls = {op: getattr(ref, op) for op in CONTRACTS if op != "linear"}  # linear: act_quant + fp8_gemm
    impls.update(faulty)
    return replace(CPU_REF, name=name, load=lambda: dict(impls), conformance_toml=None, origin="test")


def _act_quant(rounding):
    def act_quant(x, fmt, block=128, scale_fmt="fp32"):
        k = x.shape[-1]
        xb = x.float().unflatten(-1, (k // block, block))
        s = torch.clamp(xb.abs().amax(-1), min=AMAX_FLOOR) / fmt.act_max
        if scale_fmt == "ue8m0":
            s = rounding(s)
        return (xb / s.unsqueeze(-1)).to(fmt.dtype).flatten(-2), s
    return act_quant


FAULTS = {
    "ue8m0_ignored": lambda s: s,
    "ue8m0_nearest": lambda s: torch.exp2(torch.log2(s).round()),  # may round down: codes past act_max
    "ue8m0_always_bumped": lambda s: torch.exp2(torch.floor(torch.log2(s)) + 1),  # doubles exact powers of two
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_act_quant_ue8m0_faults_fail_the_ue8m0_cases_only(fault):
    rep = run(_backend(f"t_{fault}", act_quant=_act_quant(FAULTS[fault])), tier="quick",
              ops=["act_quant", "linear", "moe_experts"], dtypes=("fp8",))
    failed = {r.case for r in rep.failed}
    assert failed and all("ue8m0" in c for c in failed), sorted(failed)
    assert all(r.status == "pass" for r in rep.results if "ue8m0" not in r.case)
    if fault == "ue8m0_always_bumped":
        assert failed == {"act_quant_ue8m0_pow2_fp8"}  # only scales already a power of two tell
    else:
        assert {"act_quant_ue8m0_rows_fp8", "act_quant_ue8m0_fp32in_fp8"} <= failed


def test_moe_gate_that_always_renormalises_fails_the_no_renorm_cases():
    def moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob=True):
        return ref.moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, True)

    rep = run(_backend("t_renorm", moe_gate=moe_gate), tier="quick", ops=["moe_gate"], dtypes=("bf16",))
    assert {r.case for r in rep.failed} == {r.case for r in rep.results if "no_renorm" in r.case} != set()
