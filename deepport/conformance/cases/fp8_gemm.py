"""fp8_gemm cases: W8A8 with 1x128 activation and 128x128 weight scales; ragged N edge blocks; few tokens."""
from deepport.conformance.case import case, fp8_activation, fp8_weight


def _build(m, n, k):
    def build(g, fmt):
        a, a_scale = fp8_activation(g, m, k, fmt)
        b = fp8_weight(g, n, k, fmt=fmt, std=k ** -0.5)
        return {"a": a, "a_scale": a_scale, "b": b.weight, "b_scale": b.scale_inv}
    return build


def cases(tier):
    shapes = {"quick": [("ragged_n", 5, 200, 256), ("one_token", 1, 128, 384), ("square", 8, 256, 256)],
              "full": [("wq_a", 4, 1536, 7168), ("wkv_a", 4, 576, 7168), ("wkv_b", 2, 32768, 512),
                       ("expert_w2", 8, 7168, 2048)]}[tier]
    return [case("fp8_gemm", v, "fp8", tier, _build(m, n, k), reduction=k, note=f"M={m} N={n} K={k}")
            for v, m, n, k in shapes]
