"""mla_prefill cases: expanded-K/V attention (Dk=192, Dv=128) with DeepSeek-V3's YaRN softmax scale; large
scaled scores of both signs over a long prefix, in bf16 and fp32."""
import torch

from deepport.conformance.case import case, randn, v3_args

# scaled scores per query row: a shift (alternating +80 / -130 by row) plus a random part of std ~5 spread over the
# keys. Positive rows reach ~+100 (exp overflows fp32 above 88.7: a softmax without max subtraction gives inf/inf);
# negative rows stay below -104 (exp underflows fp32 to 0: a running max started at 0 gives 0/0)
SHIFTS = (80.0, -130.0)
SPREAD = 5.0
BIAS_DIM = 8.0  # every key's dim 0; the query's dim 0 carries the row's shift
SCORE_MAX = max(abs(s) for s in SHIFTS) + 4 * SPREAD  # 150: the largest |scaled score| (Case.magnitude)


def large_scores(g, q, k, scale):
    """Give q [.., S, H, D] / k [.., T, H, D] scaled scores = shift(row) + N(0, SPREAD^2) (fp32 staging)."""
    d = q.shape[-1]
    q = q.float() * (SPREAD / (scale * d ** 0.5))  # random part: std SPREAD with unit-normal keys
    k = k.float().clone()
    k[..., 0] = BIAS_DIM
    rows = q.shape[-3] * q.shape[-2]
    shift = torch.tensor(SHIFTS).repeat(rows)[:rows].view(q.shape[-3], q.shape[-2])
    q[..., 0] = shift / (scale * BIAS_DIM)
    return q, k


def _build(b, s, t, h, causal, large=False, dtype=torch.bfloat16):
    def build(g, fmt):
        a = v3_args()
        q, k = randn(g, b, s, h, a.qk_head_dim, dtype=torch.float32), randn(g, b, t, h, a.qk_head_dim, dtype=torch.float32)
        if large:
            q, k = large_scores(g, q, k, a.softmax_scale)
        return {"q": q.to(dtype), "k": k.to(dtype), "v": randn(g, b, t, h, a.v_head_dim, dtype=dtype),
                "causal": causal, "scale": a.softmax_scale}
    return build


def cases(tier):
    f32 = torch.float32
    shapes = {"quick": [("causal", 2, 5, 5, 2, True, False, None), ("prefix", 1, 3, 7, 2, True, False, None),
                        ("full_attn", 1, 4, 6, 2, False, False, None),
                        ("large_scores", 1, 6, 700, 2, True, True, None),
                        ("large_scores_fp32in", 2, 4, 300, 2, True, True, f32)],
              "full": [("causal", 1, 256, 256, 128, True, False, None), ("prefix", 1, 64, 320, 128, True, False, None),
                       ("batch", 2, 96, 96, 16, True, False, None),
                       ("large_scores", 1, 64, 4096, 16, True, True, None),
                       ("large_scores_fp32in", 1, 32, 2048, 16, True, True, f32)]}[tier]
    note = "scale = v3-671b softmax_scale (192^-0.5 x YaRN mscale^2)"
    big = "; scaled scores ~+80..+100 and ~-150..-110 by row (fp32 exp over/underflows without max subtraction)"
    return [case("mla_prefill", v, "bf16", tier, _build(b, s, t, h, c, large, dt or torch.bfloat16),
                 note=note + (big if large else ""), out_dtype="fp32" if dt else "", magnitude=SCORE_MAX if large else 0.0)
            for v, b, s, t, h, c, large, dt in shapes]
