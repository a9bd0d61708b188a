"""sample cases: greedy (exact, lowest index wins ties), nucleus membership, and the draw's distribution."""
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


def cases(tier):
    v = {"quick": 1000, "full": 129280}[tier]
    out = [case("sample", "greedy", "bf16", tier, _greedy(4, v), compare="exact", note="argmax, lowest index on ties"),
           case("sample", "nucleus", "bf16", tier, _nucleus(8, v, 0.7, 0.9), compare="nucleus",
                note="each drawn token must lie in the top-p nucleus of softmax(logits / T)"),
           case("sample", "distribution", "bf16", tier, _distribution(4096, 16, 0.8, 0.9), compare="distribution",
                note="4096 draws from one row: total variation to the nucleus distribution <= 0.05")]
    return out
