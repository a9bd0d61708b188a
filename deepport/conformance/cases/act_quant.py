"""act_quant cases: 1x128 fp8 activation quantisation, with outlier blocks and blocks under the amax floor;
ue8m0 (DeepSeek-V3.1): power-of-two scales, including blocks whose scale already is one (must not be bumped)."""
from deepport.conformance.case import case, randn, tie_rows


def _build(lead, k, dtype, kind, scale_fmt="fp32"):
    def build(g, fmt):
        x = randn(g, *lead, k, std=1.5, dtype=dtype)
        if kind == "outliers":
            x = x.clone()
            x[..., 5] = 300.0  # one block dominated by an outlier: the rest quantise to few codes
        if kind == "ties":  # many x / s exactly on fp8 midpoints: a reciprocal-scale quantiser flips some by one ulp
            x = tie_rows(g, lead[0], k, fmt, dtype)
        if kind == "tiny":
            x = (x.float() * 1e-6).to(dtype)  # amax below 1e-4: the floor sets the scale
        if kind == "pow2":  # block amaxes of act_max * 2^j: the scale is a power of two before rounding
            x = x.clone()
            for b in range(k // 128):
                blk = x[..., b * 128:(b + 1) * 128].float()
                blk = blk.clamp(-0.9, 0.9) * (fmt.act_max * 2.0 ** (b - 3))
                blk[..., 7] = fmt.act_max * 2.0 ** (b - 3)
                x[..., b * 128:(b + 1) * 128] = blk.to(dtype)
        return {"x": x, "fmt": fmt, "block": 128, "scale_fmt": scale_fmt}
    return build


def cases(tier):
    import torch

    shapes = {"quick": [("rows", (3,), 256, torch.bfloat16, ""), ("fp32in", (2, 3), 384, torch.float32, ""),
                        ("outliers", (4,), 256, torch.bfloat16, "outliers"), ("tiny", (2,), 128, torch.bfloat16, "tiny"),
                        ("ties", (6,), 384, torch.bfloat16, "ties")],
              "full": [("dim", (8,), 7168, torch.bfloat16, ""), ("moe_inter", (16,), 2048, torch.bfloat16, ""),
                       ("inter", (4,), 18432, torch.bfloat16, ""), ("outliers", (4,), 7168, torch.bfloat16, "outliers")]}[tier]
    out = [case("act_quant", v, "fp8", tier, _build(lead, k, dt, kind), compare="quant", reduction=128,
                note="codes compared as raw bits (1 ulp only at fp32 ties); scales to 1 fp32 ulp")
           for v, lead, k, dt, kind in shapes]
    ue8m0 = {"quick": [("ue8m0_rows", (3,), 256, torch.bfloat16, ""), ("ue8m0_fp32in", (2, 3), 384, torch.float32, ""),
                       ("ue8m0_pow2", (2,), 512, torch.bfloat16, "pow2"), ("ue8m0_tiny", (2,), 128, torch.bfloat16, "tiny")],
             "full": [("ue8m0_dim", (8,), 7168, torch.bfloat16, ""), ("ue8m0_pow2", (4,), 2048, torch.bfloat16, "pow2")]}[tier]
    out += [case("act_quant", v, "fp8", tier, _build(lead, k, dt, kind, "ue8m0"), compare="quant", reduction=128,
                 note="scale_fmt ue8m0 (DeepSeek-V3.1): scales 2^ceil(log2 s), exact; codes as raw bits")
            for v, lead, k, dt, kind in ue8m0]
    return out
