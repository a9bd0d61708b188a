"""linear cases: bf16 matmul and the W8A8 composite (act_quant + fp8_gemm) on an Fp8Weight."""
import torch

from deepport.conformance.case import case, fp8_weight, randn, served_bf16_weight, served_fp8_weight, tie_rows


def _build(lead, n, k, fp8, scale_fmt="fp32", ties=False, dtype=torch.bfloat16, served=None):
    def build(g, fmt):
        x = tie_rows(g, lead[0], k, fmt, every=16) if ties else randn(g, *lead, k, dtype=dtype)
        if served == "fp8":  # an FP8 checkpoint served in fp32: the dequantised weight carrying its codes
            return {"x": x, "w": served_fp8_weight(g, n, k, std=k ** -0.5)}
        if served == "bf16":  # a bf16 weight (an FP8 checkpoint's lm_head) served in fp32, its bf16 values attached
            return {"x": x, "w": served_bf16_weight(g, n, k, std=k ** -0.5)}
        w = fp8_weight(g, n, k, fmt=fmt, std=k ** -0.5, scale_fmt=scale_fmt) if fp8 else \
            randn(g, n, k, std=k ** -0.5, dtype=dtype)
        return {"x": x, "w": w}
    return build


def cases(tier):
    # one row (batch-1 decode) and two (MTP verification): a backend may take GEMV paths for so few rows
    shapes = {"quick": [("tokens", (2, 3), 192, 256), ("decode_1", (1, 1), 192, 256), ("verify_2", (1, 2), 192, 256),
                        ("ragged_n", (4,), 200, 384)],
              "full": [("wq_a", (2, 4), 1536, 7168), ("wkv_a", (4,), 576, 7168), ("wq_a_decode_1", (1, 1), 1536, 7168),
                       ("wq_a_verify_2", (1, 2), 1536, 7168), ("wkv_b", (3,), 32768, 512)]}[tier]
    out = []
    for v, lead, n, k in shapes:
        for dtype in ("bf16", "fp8"):
            out.append(case("linear", v, dtype, tier, _build(lead, n, k, dtype == "fp8"), reduction=k))
    # fp32 inputs (a backend serving an FP8 checkpoint in fp32, e.g. cpu's default), one to a few rows
    fp32in = {"quick": [("decode_1", (1,), 192, 256), ("verify_2", (2,), 192, 256), ("tokens", (2, 3), 192, 256)],
              "full": [("wq_a_decode_1", (1,), 1536, 7168), ("wq_a_verify_2", (2,), 1536, 7168),
                       ("wq_a", (2, 4), 1536, 7168)]}[tier]
    for v, lead, n, k in fp32in:
        out.append(case("linear", f"{v}_fp32in", "bf16", tier, _build(lead, n, k, False, dtype=torch.float32),
                        reduction=k, note="fp32 inputs", out_dtype="fp32"))
    # an FP8 checkpoint served in fp32, codes attached (cpu reads them for weights of 2^18+ and up to 16 rows)
    served = {"quick": [("decode_1", (1,), 512, 512), ("tokens", (2, 3), 520, 520)],
              "full": [("wq_a_decode_1", (1,), 1536, 7168), ("wq_a", (2, 4), 1536, 7168)]}[tier]
    for v, lead, n, k in served:
        out.append(case("linear", f"{v}_fp8served", "bf16", tier,
                        _build(lead, n, k, False, dtype=torch.float32, served="fp8"), reduction=k,
                        note="FP8 checkpoint served as fp32 (codes attached)", out_dtype="fp32"))
    # a bf16 head served in fp32, bf16 values attached (cpu reads them for 2^18+ weights and 1-2 rows); full: a
    # 4096-row slice of V3's lm_head [129280, 7168] (the whole is 3.7 GB in fp32)
    head = {"quick": [("head_decode_1", (1,), 1024, 256), ("head_verify_2", (2,), 520, 520)],
            "full": [("v3_head_slice_decode_1", (1,), 4096, 7168), ("v3_head_slice_verify_2", (2,), 4096, 7168)]}[tier]
    for v, lead, n, k in head:
        out.append(case("linear", f"{v}_bf16served", "bf16", tier,
                        _build(lead, n, k, False, dtype=torch.float32, served="bf16"), reduction=k,
                        note="bf16 weight served as fp32 (bf16 values attached)", out_dtype="fp32"))
    v, lead, n, k = shapes[-1]  # DeepSeek-V3.1 (scale_fmt ue8m0): power-of-two weight and activation scales
    out.append(case("linear", f"ue8m0_{v}", "fp8", tier, _build(lead, n, k, True, "ue8m0"), reduction=k,
                    note="scale_fmt ue8m0: act_quant rounds activation scales up to powers of two"))
    if tier == "quick":  # activations on fp8 rounding ties: act_quant may flip those codes by one ulp; fp8 linear is
        # judged on the backend's own act_quant codes when act_quant's contract accepts them (reference.on_codes)
        out.append(case("linear", "ties", "fp8", tier, _build((6,), 200, 384, True, ties=True), reduction=384,
                        note="1 in 16 activations on fp8 rounding ties; judged on the backend's own act_quant codes"))
    return out
