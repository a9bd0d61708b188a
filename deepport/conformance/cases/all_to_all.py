"""all_to_all cases: single-process exchange (identity) of bf16 rows and fp8 codes; across ranks (under torchrun)
uneven splits (1 to 3 rows per pair of ranks, never equal everywhere), bf16 rows and fp8 codes, compared bit for bit."""
import torch

from deepport.conformance.case import case, case_seed, fp8_activation, randn, world
from deepport.core.formats import format_of


def _build(m, d, fp8):
    def build(g, fmt):
        x = fp8_activation(g, m, d, fmt)[0] if fp8 else randn(g, m, d)
        return {"x": x, "output_split_sizes": [m], "input_split_sizes": [m], "group": None}
    return build


def _count(src: int, dst: int) -> int:
    """Rows rank src sends rank dst: uneven in both directions."""
    return 1 + (src + 2 * dst) % 3


def _rank_rows(name: str, rank: int, size: int, d: int, fp8, fmt):
    g = torch.Generator().manual_seed(case_seed(name) + 7919 * rank)
    m = sum(_count(rank, dst) for dst in range(size))
    return fp8_activation(g, m, d, fmt)[0] if fp8 else randn(g, m, d)


def _ranks(name, d, fp8):
    def build(g, fmt):
        rank, size = world()
        return {"x": _rank_rows(name, rank, size, d, fp8, fmt),
                "output_split_sizes": [_count(src, rank) for src in range(size)],
                "input_split_sizes": [_count(rank, dst) for dst in range(size)], "group": None}

    def expect(inputs):
        rank, size = world()
        fmt = format_of(inputs["x"].dtype) if fp8 else None
        parts = []
        for src in range(size):
            rows = _rank_rows(name, src, size, d, fp8, fmt)
            start = sum(_count(src, dst) for dst in range(rank))
            parts.append(rows[start:start + _count(src, rank)])
        return torch.cat(parts)
    return build, expect


def cases(tier):
    m, d = {"quick": (6, 128), "full": (64, 7168)}[tier]
    note = "world size 1 (identity); compared bit for bit"
    rank, size = world()
    if size == 1:
        return [case("all_to_all", "single_rank", "bf16", tier, _build(m, d, False), compare="exact", note=note),
                case("all_to_all", "single_rank", "fp8", tier, _build(m, d, True), compare="exact", note=note)]
    out = []
    if size > 1:  # the process group is up (torchrun): every rank builds the same cases
        for dtype in ("bf16", "fp8"):
            build, expect = _ranks(f"all_to_all_ranks_uneven_{dtype}", d, dtype == "fp8")
            out.append(case("all_to_all", "ranks_uneven", dtype, tier, build, compare="exact", expect=expect,
                            note=f"{size} ranks, uneven splits (1-3 rows per pair); compared bit for bit"))
    return out
