"""moe_gate cases: noaux_tc routing at V3's 256 experts / 8 groups / 4 kept / top-8, a small config, near-ties."""
import torch

from deepport.conformance.case import case, randn


def _build(m, d, e, n_groups, topk_groups, topk, tie=None, norm_topk_prob=True):
    def build(g, fmt):
        x = randn(g, m, d)
        weight = randn(g, e, d, std=d ** -0.5)
        bias = randn(g, e, std=0.1, dtype=torch.float32)
        if tie == "bias":
            bias = _near_tie_bias(x, weight, bias, n_groups, topk_groups, topk)
        if tie == "duplicate":
            weight = weight.clone()
            bias = bias.clone()
            half = e // 2  # every expert of the second half duplicates one of the first half, in another group
            weight[half:], bias[half:] = weight[:half], bias[:half]
        return {"x": x, "weight": weight, "bias": bias, "n_groups": n_groups, "topk_groups": topk_groups,
                "topk": topk, "route_scale": 2.5, "norm_topk_prob": norm_topk_prob}
    return build


def _near_tie_bias(x, weight, bias, n_groups, topk_groups, topk):
    """Move the runner-up expert of row 0 to within 3e-7 of the k-th biased score (inside a kept group)."""
    s = torch.sigmoid(x.double() @ weight.double().T)[0] + bias.double()
    groups = s.view(n_groups, -1)
    kept = groups.topk(2, -1).values.sum(-1).topk(topk_groups).indices
    masked = torch.full_like(groups, float("-inf"))
    masked[kept] = groups[kept]
    order = masked.flatten().argsort(descending=True)
    kth, runner = order[topk - 1], order[topk]
    bias = bias.clone()
    bias[runner] += float(s[kth] - s[runner]) - 3e-7
    return bias


def cases(tier):
    d = {"quick": 256, "full": 7168}[tier]
    m = {"quick": 16, "full": 64}[tier]
    shapes = [("v3", m, d, 256, 8, 4, 8, None), ("small", 8, 64, 16, 4, 2, 4, None),
              ("ungrouped", 8, 64, 32, 1, 1, 6, None), ("near_tie", m, d, 256, 8, 4, 8, "bias"),
              ("exact_tie", 8, 64, 64, 8, 4, 8, "duplicate")]
    note = "sets must match except within 1e-5 of a tie (k-th vs k+1-th biased score, or kept-group boundary)"
    # decode-sized rows: batch-1 decode (M=1) and MTP's 2-token verification (M=2) at V3's routing config; a
    # backend may route so few rows differently (the cpu backend sorts them on the host)
    shapes += [("v3_decode", 1, d, 256, 8, 4, 8, None), ("near_tie_decode", 1, d, 256, 8, 4, 8, "bias"),
               ("v3_verify", 2, d, 256, 8, 4, 8, None), ("exact_tie_verify", 2, 64, 64, 8, 4, 8, "duplicate")]
    out = [case("moe_gate", v, "bf16", tier, _build(*shape, tie=tie), compare="routing", reduction=shape[1],
                note=note) for v, *shape, tie in shapes]
    # norm_topk_prob=false (HF config): weights s[ids] * route_scale, not renormalised
    no_renorm = [("no_renorm_v3", m, d, 256, 8, 4, 8), ("no_renorm_ungrouped", 8, 64, 48, 1, 1, 8)]
    out += [case("moe_gate", v, "bf16", tier, _build(*shape, norm_topk_prob=False), compare="routing",
                 reduction=shape[1], note="norm_topk_prob=false: " + note) for v, *shape in no_renorm]
    return out
