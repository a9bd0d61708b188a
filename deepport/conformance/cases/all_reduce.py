"""all_reduce cases: the identity at world size 1; across ranks (under torchrun) the sum of every rank's seeded
rows, in bf16 and fp32, on a value grid whose sums are exact in any order (so any reduction order is judged exactly)."""
import torch

from deepport.conformance.case import case, case_seed, randn, world


def _build(shape):
    def build(g, fmt):
        return {"x": randn(g, *shape), "group": None}
    return build


def _rank_rows(name: str, rank: int, shape, dtype) -> torch.Tensor:
    """Rank `rank`'s rows: multiples of 1/16 in [-1, 1], exact in bf16, and so are sums of up to 256 ranks' rows."""
    g = torch.Generator().manual_seed(case_seed(name) + 7919 * rank)
    return (torch.randint(-16, 17, shape, generator=g).to(torch.float32) / 16).to(dtype)


def _ranks(name, shape, dtype):
    def build(g, fmt):
        return {"x": _rank_rows(name, world()[0], shape, dtype), "group": None}

    def expect(inputs):
        return sum(_rank_rows(name, r, shape, torch.float64) for r in range(world()[1])).to(dtype)
    return build, expect


def cases(tier):
    shape = {"quick": (4, 64), "full": (16, 7168)}[tier]
    rank, size = world()
    if size == 1:
        return [case("all_reduce", "single_rank", "bf16", tier, _build(shape),
                     note="world size 1 (identity); run under torchrun for the multi-rank sums")]
    out = []
    if size > 1:  # the process group is up (torchrun): every rank builds the same cases
        for variant, dtype in (("ranks", torch.bfloat16), ("ranks_fp32", torch.float32)):
            name = f"all_reduce_{variant}_bf16"
            build, expect = _ranks(name, shape, dtype)
            out.append(case("all_reduce", variant, "bf16", tier, build, compare="exact", expect=expect,
                            out_dtype="fp32" if dtype == torch.float32 else "",
                            note=f"{size} ranks: the sum of every rank's rows (exact on a 1/16 grid)"))
    return out
