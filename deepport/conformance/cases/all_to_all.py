"""all_to_all cases: single-process exchange (identity) of bf16 rows and fp8 codes."""
from deepport.conformance.case import case, fp8_activation, randn


def _build(m, d, fp8):
    def build(g, fmt):
        x = fp8_activation(g, m, d, fmt)[0] if fp8 else randn(g, m, d)
        return {"x": x, "output_split_sizes": [m], "input_split_sizes": [m], "group": None}
    return build


def cases(tier):
    m, d = {"quick": (6, 128), "full": (64, 7168)}[tier]
    note = "world size 1 (identity); compared bit for bit"
    return [case("all_to_all", "single_rank", "bf16", tier, _build(m, d, False), compare="exact", note=note),
            case("all_to_all", "single_rank", "fp8", tier, _build(m, d, True), compare="exact", note=note)]
