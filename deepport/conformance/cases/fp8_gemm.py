"""fp8_gemm cases: W8A8 with 1x128 activation and 128x128 weight scales; ragged N edge blocks; few tokens;
bf16 (default) and fp32 out_dtype."""
import torch

from deepport.conformance.case import case, fp8_activation, fp8_weight


def _build(m, n, k, out_dtype=None):
    def build(g, fmt):
        a, a_scale = fp8_activation(g, m, k, fmt)
        b = fp8_weight(g, n, k, fmt=fmt, std=k ** -0.5)
        args = {"a": a, "a_scale": a_scale, "b": b.weight, "b_scale": b.scale_inv}
        if out_dtype is not None:
            args["out_dtype"] = out_dtype
        return args
    return build


def cases(tier):
    f32 = torch.float32
    shapes = {"quick": [("ragged_n", 5, 200, 256, None), ("one_token", 1, 128, 384, None), ("square", 8, 256, 256, None),
                        ("fp32out", 6, 200, 384, f32)],
              "full": [("wq_a", 4, 1536, 7168, None), ("wkv_a", 4, 576, 7168, None), ("wkv_b", 2, 32768, 512, None),
                       ("expert_w2", 8, 7168, 2048, None), ("fp32out", 4, 1536, 7168, f32)]}[tier]
    return [case("fp8_gemm", v, "fp8", tier, _build(m, n, k, dt), reduction=k, out_dtype="fp32" if dt else "",
                 note=f"M={m} N={n} K={k}" + (", out_dtype=float32" if dt else ""))
            for v, m, n, k, dt in shapes]
