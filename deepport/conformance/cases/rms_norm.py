"""rms_norm cases: plain and fused-residual norms at the model's widths (dim, q_lora, kv_lora)."""
from deepport.conformance.case import case, randn

_EPS = 1e-6  # DeepSeek-V3's rms_norm_eps


def _build(lead, d, residual):
    def build(g, fmt):
        x = randn(g, *lead, d, std=2.0, mean=0.3)
        args = {"x": x, "weight": randn(g, d, std=0.2, mean=1.0, dtype=x.dtype), "eps": _EPS}
        if residual:
            args["residual"] = randn(g, *lead, d)
        return args
    return build


def cases(tier):
    shapes = {"quick": [("plain", (2, 5), 64, False), ("residual", (2, 5), 64, True),
                        ("kvlora", (3,), 512, False)],
              "full": [("dim", (4,), 7168, False), ("dim_residual", (4,), 7168, True),
                       ("qlora", (2, 3), 1536, False), ("kvlora", (2, 3), 512, False)]}[tier]
    return [case("rms_norm", v, "bf16", tier, _build(lead, d, res), reduction=d)
            for v, lead, d, res in shapes]
