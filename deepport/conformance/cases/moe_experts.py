"""moe_experts cases: routed SwiGLU experts in bf16 and W8A8 fp8, with ids < 0 (other ranks' experts)."""
import torch

from deepport.conformance.case import case, fp8_weight, randn, served_fp8_weight


def _build(m, d, inter, e, k, fp8, scale_fmt="fp32", dtype=torch.bfloat16, served=False):
    def build(g, fmt):
        x = randn(g, m, d, dtype=dtype)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(m)])
        ids[0, -1] = -1  # routed to an expert on another rank: contributes nothing
        weights = torch.rand(m, k, generator=g) + 0.1
        weights = weights / weights.sum(-1, keepdim=True) * 2.5
        if served:  # an FP8 checkpoint served in fp32: dequantised weights carrying their codes
            w1, w3 = (served_fp8_weight(g, e, inter, d, std=d ** -0.5) for _ in range(2))
            w2 = served_fp8_weight(g, e, d, inter, std=inter ** -0.5)
        elif fp8:
            w1 = fp8_weight(g, e, inter, d, fmt=fmt, std=d ** -0.5, scale_fmt=scale_fmt)
            w3 = fp8_weight(g, e, inter, d, fmt=fmt, std=d ** -0.5, scale_fmt=scale_fmt)
            w2 = fp8_weight(g, e, d, inter, fmt=fmt, std=inter ** -0.5, scale_fmt=scale_fmt)
        else:
            w1 = randn(g, e, inter, d, std=d ** -0.5, dtype=dtype)
            w3 = randn(g, e, inter, d, std=d ** -0.5, dtype=dtype)
            w2 = randn(g, e, d, inter, std=inter ** -0.5, dtype=dtype)
        return {"x": x, "topk_weights": weights, "topk_ids": ids, "w1": w1, "w2": w2, "w3": w3}
    return build


def cases(tier):
    # M=1 (batch-1 decode) and M=2 (MTP verification): a backend may take a per-token path for so few rows
    shapes = {"quick": [("decode", 3, 256, 128, 8, 3), ("prefill", 24, 256, 128, 8, 3),
                        ("decode_1", 1, 256, 128, 8, 3), ("verify_2", 2, 256, 128, 8, 3)],
              "full": [("v3_subset", 16, 7168, 2048, 16, 8), ("v3_subset_decode_1", 1, 7168, 2048, 16, 8),
                       ("v3_subset_verify_2", 2, 7168, 2048, 16, 8)]}[tier]
    out = []
    for v, m, d, inter, e, k in shapes:
        note = f"M={m} D={d} I={inter}, {e} experts, top-{k}"
        if tier == "full":
            note += "; real expert shape, 16 of the 256 experts (memory)"
        for dtype in ("bf16", "fp8"):
            # the contract rounds gate/up and the SwiGLU product to x.dtype (and act_quant reads them for fp8),
            # so the reference runs cpu_ref in x.dtype with its fp32 math, not in fp64
            out.append(case("moe_experts", v, dtype, tier, _build(m, d, inter, e, k, dtype == "fp8"),
                            reduction=d + inter, note=note, reference="native"))
    # fp32 inputs (a backend serving an FP8 checkpoint in fp32, e.g. cpu's default): a backend may take other
    # paths for them; one token, two (MTP verification: top-8 of 16 experts, so the two tokens share experts, which
    # cpu runs once as 2-row GEMMs), and a group per expert
    fp32in = {"quick": [("decode_1", 1, 256, 128, 8, 3), ("verify_2", 2, 256, 128, 8, 3),
                        ("prefill", 24, 256, 128, 8, 3)],
              "full": [("v3_subset_decode_1", 1, 7168, 2048, 16, 8), ("v3_subset_verify_2", 2, 7168, 2048, 16, 8),
                       ("v3_subset", 16, 7168, 2048, 16, 8)]}[tier]
    for v, m, d, inter, e, k in fp32in:
        out.append(case("moe_experts", f"{v}_fp32in", "bf16", tier,
                        _build(m, d, inter, e, k, False, dtype=torch.float32), reduction=d + inter,
                        note=f"fp32 inputs; M={m} D={d} I={inter}, {e} experts, top-{k}", reference="native",
                        out_dtype="fp32"))
    # an FP8 checkpoint served in fp32 (cpu's default): weights dequantised, their codes attached, which a backend
    # may read instead (cpu's C kernel for up to 16 tokens); one token, and a batch in blocks of tokens per expert
    served = {"quick": [("decode_1", 1, 256, 128, 8, 3), ("decode", 6, 256, 128, 8, 3)],
              "full": [("v3_subset_decode_1", 1, 7168, 2048, 16, 8), ("v3_subset", 16, 7168, 2048, 16, 8)]}[tier]
    for v, m, d, inter, e, k in served:
        out.append(case("moe_experts", f"{v}_fp8served", "bf16", tier,
                        _build(m, d, inter, e, k, False, dtype=torch.float32, served=True), reduction=d + inter,
                        note=f"FP8 checkpoint served as fp32 (codes attached); M={m} D={d} I={inter}, {e} experts, "
                             f"top-{k}", reference="native", out_dtype="fp32"))
    if tier == "quick":  # DeepSeek-V3.1 (scale_fmt ue8m0): the fused activation quantisation rounds scales up
        out.append(case("moe_experts", "ue8m0_decode", "fp8", tier, _build(3, 256, 128, 8, 3, True, "ue8m0"),
                        reduction=256 + 128, note="scale_fmt ue8m0 experts", reference="native"))
    return out
