"""rope cases: interleaved pairs with DeepSeek-V3's YaRN tables, each sequence at its own positions."""
import torch

from deepport.conformance.case import case, randn, v3_args


def _tables(positions):
    from deepport.core.model import yarn_inv_freq

    args = v3_args()
    angles = positions.double().unsqueeze(-1) * yarn_inv_freq(args).double()  # [B, S, R/2]
    f = args.rope_attention_factor
    return (torch.cos(angles) * f).float(), (torch.sin(angles) * f).float()


def _build(b, s, h, max_pos, dtype=torch.bfloat16):
    def build(g, fmt):
        x = randn(g, b, s, h, v3_args().qk_rope_head_dim, dtype=dtype)
        start = torch.randint(0, max_pos - s, (b, 1), generator=g)
        cos, sin = _tables(start + torch.arange(s))
        return {"x": x, "cos": cos, "sin": sin}
    return build


def cases(tier):
    f32 = torch.float32
    shapes = {"quick": [("q", 2, 3, 4, 4096, None), ("k", 3, 2, 1, 8192, None), ("fp32in", 2, 3, 4, 163840, f32)],
              "full": [("q", 2, 16, 128, 163840, None), ("k", 4, 64, 1, 163840, None),
                       ("fp32in", 2, 16, 128, 163840, f32)]}[tier]
    return [case("rope", v, "bf16", tier, _build(b, s, h, p, dt or torch.bfloat16), out_dtype="fp32" if dt else "",
                 note="YaRN cos/sin (v3-671b), ragged positions") for v, b, s, h, p, dt in shapes]
