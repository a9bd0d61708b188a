"""mla_prefill cases: expanded-K/V attention (Dk=192, Dv=128) with DeepSeek-V3's YaRN softmax scale."""
from deepport.conformance.case import case, randn, v3_args


def _build(b, s, t, h, causal):
    def build(g, fmt):
        a = v3_args()
        return {"q": randn(g, b, s, h, a.qk_head_dim), "k": randn(g, b, t, h, a.qk_head_dim),
                "v": randn(g, b, t, h, a.v_head_dim), "causal": causal, "scale": a.softmax_scale}
    return build


def cases(tier):
    shapes = {"quick": [("causal", 2, 5, 5, 2, True), ("prefix", 1, 3, 7, 2, True), ("full_attn", 1, 4, 6, 2, False)],
              "full": [("causal", 1, 256, 256, 128, True), ("prefix", 1, 64, 320, 128, True),
                       ("batch", 2, 96, 96, 16, True)]}[tier]
    note = "scale = v3-671b softmax_scale (192^-0.5 x YaRN mscale^2)"
    return [case("mla_prefill", v, "bf16", tier, _build(b, s, t, h, c), note=note)
            for v, b, s, t, h, c in shapes]
