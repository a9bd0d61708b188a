"""weight_dequant cases: 128x128 block-scaled fp8 weights, including ragged edge blocks in N and K."""
import torch

from deepport.conformance.case import case, fp8_weight


def _build(n, k, out_dtype):
    def build(g, fmt):
        w = fp8_weight(g, n, k, fmt=fmt, std=0.05)
        return {"w": w.weight, "scale_inv": w.scale_inv, "block": 128, "out_dtype": out_dtype}
    return build


def cases(tier):
    shapes = {"quick": [("square", 256, 384, torch.bfloat16), ("ragged", 200, 330, torch.bfloat16),
                        ("fp32out", 130, 256, torch.float32)],
              "full": [("wkv_a", 576, 7168, torch.bfloat16), ("expert_w2", 7168, 2048, torch.bfloat16),
                       ("wq_b", 24576, 1536, torch.bfloat16), ("ragged", 1000, 7000, torch.float32)]}[tier]
    return [case("weight_dequant", v, "fp8", tier, _build(n, k, dt), out_dtype="fp32" if dt == torch.float32 else "",
                 note="exact reference: judged with the output dtype's tolerance") for v, n, k, dt in shapes]
