"""rms_norm cases: plain and fused-residual norms at the model's widths (dim, q_lora, kv_lora), in bf16 and fp32,
with near-zero rows (eps decides the scale: eps inside the sqrt) and very large rows (fp32 accumulation)."""
import torch

from deepport.conformance.case import case, randn

_EPS = 1e-6  # DeepSeek-V3's rms_norm_eps
# near-zero rows: mean(x^2) from 1e-8 (eps dominates: y = x / sqrt(eps)) to 1e-5 (eps is 10%): eps outside the
# sqrt, or added to the rms instead of the mean square, moves y by 5% to 10x
_TINY = (1e-4, 3e-4, 1e-3, 3e-3)
# very large rows: |x| up to ~2.5e5, so x^2 overflows fp16 (65504) and a bf16 accumulator of the squares
# stalls; the fp32 mean square (<= 1e11) is far from fp32's range
_HUGE = (3e2, 5e3, 6e4)


def _build(lead, d, residual, dtype=torch.bfloat16, rows=None):
    def build(g, fmt):
        x = randn(g, *lead, d, std=2.0, mean=0.3, dtype=torch.float32)
        if rows is not None:  # one scale per row (lead is (len(rows),))
            x = x * torch.tensor(rows, dtype=torch.float32).view(-1, 1)
        x = x.to(dtype)
        args = {"x": x, "weight": randn(g, d, std=0.2, mean=1.0, dtype=x.dtype), "eps": _EPS}
        if residual:
            res = randn(g, *lead, d, dtype=torch.float32)
            if rows is not None:
                res = res * torch.tensor(rows, dtype=torch.float32).view(-1, 1)
            args["residual"] = res.to(dtype)
        return args
    return build


def cases(tier):
    f32 = torch.float32
    shapes = {"quick": [("plain", (2, 5), 64, False, None, None), ("residual", (2, 5), 64, True, None, None),
                        ("kvlora", (3,), 512, False, None, None), ("fp32in", (2, 3), 512, True, f32, None),
                        ("tiny_rows", (4,), 512, False, None, _TINY), ("tiny_rows_fp32in", (4,), 512, True, f32, _TINY),
                        ("huge_rows", (3,), 2048, False, None, _HUGE), ("huge_rows_fp32in", (3,), 2048, True, f32, _HUGE)],
              "full": [("dim", (4,), 7168, False, None, None), ("dim_residual", (4,), 7168, True, None, None),
                       ("qlora", (2, 3), 1536, False, None, None), ("kvlora", (2, 3), 512, False, None, None),
                       ("dim_fp32in", (4,), 7168, True, f32, None),
                       ("qlora_decode_1_fp32in", (1,), 1536, False, f32, None),
                       ("tiny_rows", (4,), 7168, False, None, _TINY),
                       ("huge_rows", (3,), 7168, True, None, _HUGE)]}[tier]
    out = []
    for v, lead, d, res, dt, rows in shapes:
        note = "near-zero rows: mean(x^2) 1e-8..1e-5 against eps 1e-6" if rows is _TINY else \
            "very large rows: |x| up to ~2e5 (x^2 overflows fp16; squares need fp32 accumulation)" if rows is _HUGE else ""
        out.append(case("rms_norm", v, "bf16", tier, _build(lead, d, res, dt or torch.bfloat16, rows), reduction=d,
                        note=note, out_dtype="fp32" if dt == f32 else ""))
    return out
