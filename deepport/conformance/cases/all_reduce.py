"""all_reduce cases: in a single process (world size 1) the contract is the identity."""
from deepport.conformance.case import case, randn


def _build(shape):
    def build(g, fmt):
        return {"x": randn(g, *shape), "group": None}
    return build


def cases(tier):
    shape = {"quick": (4, 64), "full": (16, 7168)}[tier]
    return [case("all_reduce", "single_rank", "bf16", tier, _build(shape),
                 note="world size 1 (identity); multi-rank sums need a torch.distributed launch")]
