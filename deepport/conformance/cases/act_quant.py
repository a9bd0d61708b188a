"""act_quant cases: 1x128 fp8 activation quantisation, with outlier blocks and blocks under the amax floor."""
from deepport.conformance.case import case, randn


def _build(lead, k, dtype, kind):
    def build(g, fmt):
        x = randn(g, *lead, k, std=1.5, dtype=dtype)
        if kind == "outliers":
            x = x.clone()
            x[..., 5] = 300.0  # one block dominated by an outlier: the rest quantise to few codes
        if kind == "tiny":
            x = (x.float() * 1e-6).to(dtype)  # amax below 1e-4: the floor sets the scale
        return {"x": x, "fmt": fmt, "block": 128}
    return build


def cases(tier):
    import torch

    shapes = {"quick": [("rows", (3,), 256, torch.bfloat16, ""), ("fp32in", (2, 3), 384, torch.float32, ""),
                        ("outliers", (4,), 256, torch.bfloat16, "outliers"), ("tiny", (2,), 128, torch.bfloat16, "tiny")],
              "full": [("dim", (8,), 7168, torch.bfloat16, ""), ("moe_inter", (16,), 2048, torch.bfloat16, ""),
                       ("inter", (4,), 18432, torch.bfloat16, ""), ("outliers", (4,), 7168, torch.bfloat16, "outliers")]}[tier]
    return [case("act_quant", v, "fp8", tier, _build(lead, k, dt, kind), compare="quant", reduction=128,
                 note="codes compared as raw bits (1 ulp only at fp32 ties); scales to 1 fp32 ulp")
            for v, lead, k, dt, kind in shapes]
