"""linear cases: bf16 matmul and the W8A8 composite (act_quant + fp8_gemm) on an Fp8Weight."""
from deepport.conformance.case import case, fp8_weight, randn, tie_rows


def _build(lead, n, k, fp8, scale_fmt="fp32", ties=False):
    def build(g, fmt):
        x = tie_rows(g, lead[0], k, fmt, every=16) if ties else randn(g, *lead, k)
        w = fp8_weight(g, n, k, fmt=fmt, std=k ** -0.5, scale_fmt=scale_fmt) if fp8 else randn(g, n, k, std=k ** -0.5)
        return {"x": x, "w": w}
    return build


def cases(tier):
    shapes = {"quick": [("tokens", (2, 3), 192, 256), ("ragged_n", (4,), 200, 384)],
              "full": [("wq_a", (2, 4), 1536, 7168), ("wkv_a", (4,), 576, 7168), ("wkv_b", (3,), 32768, 512)]}[tier]
    out = []
    for v, lead, n, k in shapes:
        for dtype in ("bf16", "fp8"):
            out.append(case("linear", v, dtype, tier, _build(lead, n, k, dtype == "fp8"), reduction=k))
    v, lead, n, k = shapes[-1]  # DeepSeek-V3.1 (scale_fmt ue8m0): power-of-two weight and activation scales
    out.append(case("linear", f"ue8m0_{v}", "fp8", tier, _build(lead, n, k, True, "ue8m0"), reduction=k,
                    note="scale_fmt ue8m0: act_quant rounds activation scales up to powers of two"))
    if tier == "quick":  # activations on fp8 rounding ties: act_quant may flip those codes by one ulp; fp8 linear is
        # judged on the backend's own act_quant codes when act_quant's contract accepts them (reference.on_codes)
        out.append(case("linear", "ties", "fp8", tier, _build((6,), 200, 384, True, ties=True), reduction=384,
                        note="1 in 16 activations on fp8 rounding ties; judged on the backend's own act_quant codes"))
    return out
