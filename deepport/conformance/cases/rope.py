"""rope cases: interleaved pairs with DeepSeek-V3's YaRN tables, each sequence at its own positions."""
import torch

from deepport.conformance.case import case, randn, v3_args


def _tables(positions):
    from deepport.core.model import yarn_inv_freq

    args = v3_args()
    angles = positions.double().unsqueeze(-1) * yarn_inv_freq(args).double()  # [B, S, R/2]
    f = args.rope_attention_factor
    return (torch.cos(angles) * f).float(), (torch.sin(angles) * f).float()


def _build(b, s, h, max_pos):
    def build(g, fmt):
        x = randn(g, b, s, h, v3_args().qk_rope_head_dim)
        start = torch.randint(0, max_pos - s, (b, 1), generator=g)
        cos, sin = _tables(start + torch.arange(s))
        return {"x": x, "cos": cos, "sin": sin}
    return build


def cases(tier):
    shapes = {"quick": [("q", 2, 3, 4, 4096), ("k", 3, 2, 1, 8192)],
              "full": [("q", 2, 16, 128, 163840), ("k", 4, 64, 1, 163840)]}[tier]
    return [case("rope", v, "bf16", tier, _build(b, s, h, p), note="YaRN cos/sin (v3-671b), ragged positions")
            for v, b, s, h, p in shapes]
