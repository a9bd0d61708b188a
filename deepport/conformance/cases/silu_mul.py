"""silu_mul cases: SwiGLU activation at expert and dense widths."""
from deepport.conformance.case import case, randn


def _build(lead, i):
    def build(g, fmt):
        return {"x": randn(g, *lead, 2 * i, std=2.0)}
    return build


def cases(tier):
    shapes = {"quick": [("tokens", (3,), 128), ("batched", (2, 4), 96)],
              "full": [("dense", (4,), 18432), ("expert", (16,), 2048)]}[tier]
    return [case("silu_mul", v, "bf16", tier, _build(lead, i)) for v, lead, i in shapes]
