"""silu_mul cases: SwiGLU activation at expert and dense widths, in bf16 and fp32."""
import torch

from deepport.conformance.case import case, randn


def _build(lead, i, dtype=torch.bfloat16):
    def build(g, fmt):
        return {"x": randn(g, *lead, 2 * i, std=2.0, dtype=dtype)}
    return build


def cases(tier):
    f32 = torch.float32
    shapes = {"quick": [("tokens", (3,), 128, None), ("batched", (2, 4), 96, None), ("fp32in", (3,), 160, f32)],
              "full": [("dense", (4,), 18432, None), ("expert", (16,), 2048, None), ("fp32in", (4,), 2048, f32)]}[tier]
    return [case("silu_mul", v, "bf16", tier, _build(lead, i, dt or torch.bfloat16), out_dtype="fp32" if dt else "")
            for v, lead, i, dt in shapes]
