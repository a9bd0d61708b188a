"""sample cases: greedy (exact, lowest index wins ties), nucleus membership, the draws' distribution (chi-square,
with a boundary token of known mass and with temperature alone, top_p = 1), and the generator the op draws from."""
import torch

from deepport.conformance.case import case, randn


def _greedy(b, v):
    def build(g, fmt):
        logits = randn(g, b, v, std=3.0, dtype=torch.float32)
        logits[0, 7] = logits[0, 3] = logits[0].max() + 1.0  # a tie: index 3 must win
        return {"logits": logits, "temperature": 0.0, "top_p": 1.0, "generator": None}
    return build


def _nucleus(b, v, temperature, top_p):
    def build(g, fmt):
        logits = randn(g, b, v, std=3.0, dtype=torch.float32)
        return {"logits": logits, "temperature": temperature, "top_p": top_p,
                "generator": torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))}
    return build


def _distribution(rows, v, temperature, top_p):
    def build(g, fmt):
        row = randn(g, v, std=1.5, dtype=torch.float32)
        return {"logits": row.expand(rows, v).contiguous(), "temperature": temperature, "top_p": top_p,
                "generator": torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))}
    return build


# the boundary row: nucleus probabilities after temperature. top_p = 0.92 keeps the 5th token (mass before it 0.90)
# and cuts the 6th (0.96): a nucleus one token short drops 6.25% of the renormalised mass, so its chi-square
# statistic is at least N * 0.0625 = 256 whatever the draws (power 1; the alpha = 1e-6 cut is ~33 on 4 df)
BOUNDARY_P = (0.30, 0.25, 0.20, 0.15, 0.06) + (0.04 / 11,) * 11
BOUNDARY_TOP_P = 0.92


def _boundary(rows, temperature):
    def build(g, fmt):
        p = torch.tensor(BOUNDARY_P, dtype=torch.float64)[torch.randperm(len(BOUNDARY_P), generator=g)]
        row = (p.log() * temperature).float()  # softmax(row / T) = p
        return {"logits": row.expand(rows, -1).contiguous(), "temperature": temperature, "top_p": BOUNDARY_TOP_P,
                "generator": torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))}
    return build


def cases(tier):
    v = {"quick": 1000, "full": 129280}[tier]
    out = [case("sample", "greedy", "bf16", tier, _greedy(4, v), compare="exact", note="argmax, lowest index on ties"),
           case("sample", "nucleus", "bf16", tier, _nucleus(8, v, 0.7, 0.9), compare="nucleus",
                note="each drawn token must lie in the top-p nucleus of softmax(logits / T)"),
           case("sample", "distribution", "bf16", tier, _distribution(4096, 16, 0.8, 0.9), compare="distribution",
                note="4096 draws from one row: chi-square fit to the nucleus distribution (p >= 1e-6), TV <= 0.05"),
           case("sample", "boundary", "bf16", tier, _boundary(4096, 0.7), compare="distribution",
                note="4096 draws; top_p 0.92 keeps a boundary token of 6.25% nucleus mass: a nucleus one short fails"),
           case("sample", "temperature_only", "bf16", tier, _distribution(4096, 16, 0.6, 1.0), compare="distribution",
                note="temperature 0.6 with top_p 1 (the CLI's --temperature alone): chi-square fit to softmax(l / T)"),
           case("sample", "seeded", "bf16", tier, _nucleus({"quick": 64, "full": 16}[tier], v, 1.0, 0.95), compare="seeded",
                note="drawn three times: same seed -> same tokens, another seed -> other tokens")]
    return out
