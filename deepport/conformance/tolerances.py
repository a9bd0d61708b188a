"""The one tolerance table: (tolerance class x dtype) -> rtol and a per-sqrt(reduction) atol.

Classes come from deepport.core.ops.TOLERANCE_CLASS. ``atol = ATOL * sqrt(case.reduction)`` (FlagGems'
rule: accumulation error grows with the square root of the reduction length); the cases' inputs are
unit-scale, which the base atols assume. A backend loosens a case or op only in its conformance.toml.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from deepport.core.ops import TOLERANCE_CLASS

BF16_RTOL = 1.6e-2  # 4 bf16 ulps: one output rounding plus fp32 accumulation-order differences
FP32_ULP = 2.0 ** -23
FP32_RTOL = 1e-5  # fp32 outputs: ~80 fp32 ulps (exp/rsqrt approximations, reduction order); a bf16 rounding is 2^-9
TIE_EPS = 1e-5  # routing: biased scores this close count as a tie (the moe_gate contract's epsilon)
SAMPLE_TV = 0.05  # sampling: total-variation bound between drawn frequencies and the nucleus distribution (reported)
# sampling: the chi-square goodness-of-fit test of drawn frequencies against the nucleus distribution fails below
# this p-value, so a correct sampler fails a distribution case once in a million seeds (power: docs/conformance.md)
SAMPLE_ALPHA = 1e-6
SAMPLE_MIN_EXPECTED = 5.0  # chi-square cells expecting fewer draws are pooled (the test's usual validity rule)


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


# class -> row -> (rtol, atol per sqrt(reduction)). The row is the case's *output* dtype: "fp32" for cases whose
# outputs are fp32 (Case.out_dtype), else the case dtype (fp8 cases produce bf16 outputs, or fp8 codes for quant).
TABLE: dict[str, dict[str, tuple[float, float]]] = {
    "norm":        {"bf16": (BF16_RTOL, 1e-5), "fp8": (BF16_RTOL, 1e-5), "fp32": (FP32_RTOL, 1e-6)},
    "elementwise": {"bf16": (BF16_RTOL, 1e-5), "fp8": (BF16_RTOL, 1e-5), "fp32": (FP32_RTOL, 1e-6)},
    # fp8: Hopper-style MMAs keep ~14 bits inside a 128-K block before promotion; that is the atol (kept for
    # fp32 outputs, whose rtol no longer hides a bf16 rounding of C)
    "gemm":        {"bf16": (BF16_RTOL, 1e-5), "fp8": (BF16_RTOL, 1e-4), "fp32": (FP32_RTOL, 1e-4)},
    # attention cases use reduction=1: the output is a convex combination of V rows, so its error does not
    # grow with T; 1e-3 is half a bf16 ulp of a unit V row, the cost of rounding p to bf16 before p @ V.
    # fp32: p stays fp32; 1e-5 leaves room for hardware exp2 approximations (2^-22 relative) at unit-scale
    # scores (|s| <= ~5); cases with large scores add MAGNITUDE_ATOL below
    "attention":   {"bf16": (BF16_RTOL, 1e-3), "fp8": (BF16_RTOL, 1e-3), "fp32": (1e-4, 1e-5)},
    # routing weights are fp32 from fp32 math: tight; sets are compared separately (TIE_EPS)
    "routing":     {"bf16": (1e-4, 1e-6), "fp8": (1e-4, 1e-6), "fp32": (1e-4, 1e-6)},
    # quant: scales within one fp32 ulp; codes are compared as bits in compare.py
    "quant":       {"bf16": (FP32_ULP, 0.0), "fp8": (FP32_ULP, 0.0), "fp32": (FP32_ULP, 0.0)},
    "exact":       {"bf16": (0.0, 0.0), "fp8": (0.0, 0.0), "fp32": (0.0, 0.0)},
    # all_reduce: identity at world size 1; across ranks a sum of two is one rounding (exact against the fp64
    # sum rounded once); more ranks add a slack of one output ulp per extra rank (reference.py)
    "collective":  {"bf16": (0.0, 0.0), "fp8": (0.0, 0.0), "fp32": (0.0, 0.0)},
}

# Per-op entries that take precedence over the class. moe_experts chains three GEMMs through values the
# contract rounds to bf16 (gate/up, the SwiGLU product, each expert's down-projection output): fp32 summation
# order alone flips such a rounding by one ulp now and then, which moves y by up to ~2^-8 |o| w, a few 1e-3
# on the unit-scale cases, while y itself may be near zero after the weighted sum cancels (measured under the
# interpreter: 4.1e-3 on moe_experts_prefill_bf16 from one flipped down-projection rounding; cpu_ref itself is
# 1.95e-3 away from fp64-then-bf16 intermediates on moe_experts_decode_bf16).
OP_TABLE: dict[str, dict[str, tuple[float, float]]] = {
    "moe_experts": {"bf16": (BF16_RTOL, 5e-4)},
}


# class -> atol per unit of Case.magnitude, added to the row's atol (every row: independent errors add).
# attention: magnitude = the case's largest |scaled score| S. An fp32 score s = scale * sum_i q_i k_i over
# Dk <= 576 terms carries a rounding error of about u * sqrt(Dk) * |s| (u = 2^-24; partial sums of size ~|s|,
# roundings adding as a random walk): 1.4e-6 |s| at Dk = 576. A score error d moves the output by about
# d * |v| when few keys dominate the softmax (the large-score cases are built so), so atol grows by
# 2e-6 * S: 3e-4 at S = 150. Measured on the quick large-score fp32 cases (fp64 reference): cpu_ref's fp32
# math is 6.9e-5 (prefill) / 1.5e-5 (decode) off, an exp2 softmax with log2(e) folded into the scale 7.4e-5;
# p rounded to bf16 before p @ V is 5.2e-3 / 8.1e-4 off (fails), and a softmax without max subtraction or a
# running max started at 0 gives inf/inf or 0/0 (fails at any tolerance).
MAGNITUDE_ATOL: dict[str, float] = {"attention": 2e-6}


def tolerance(case, overrides=None) -> Tol:
    """Tol for `case`: the table's entry for its output dtype, atol scaled by sqrt(reduction) plus
    MAGNITUDE_ATOL x case.magnitude, then a policy override by case name or op.

    overrides: {case name or op: {"rtol": x, "atol": y}} (a Policy's `overrides()`); a case-name entry wins.
    Override values are absolute (not scaled again).
    """
    cls = TOLERANCE_CLASS[case.op]
    row = getattr(case, "out_dtype", "") or case.dtype  # the output dtype sets the tolerance
    rtol, atol = OP_TABLE.get(case.op, {}).get(row) or TABLE[cls][row]
    atol = atol * math.sqrt(max(case.reduction, 1)) + MAGNITUDE_ATOL.get(cls, 0.0) * getattr(case, "magnitude", 0.0)
    tol = Tol(rtol, atol)
    for key in (case.op, case.name):
        o = (overrides or {}).get(key)
        if o:
            tol = Tol(o.get("rtol", tol.rtol), o.get("atol", tol.atol))
    return tol
