"""moe_gate: DeepSeek-V3's sigmoid router (noaux_tc): scores, biased group-limited top-k, weights renormalised
unless norm_topk_prob is false."""
import torch
import triton
import triton.language as tl

from deepport.core.errors import ContractError
from deepport.kernels.launch import launch
from deepport.kernels.targets import CompileSpec

DEFAULT_CONFIGS = [{"BLOCK_M": 16, "BLOCK_D": 64, "num_warps": 4}]


@triton.jit
def _first_argmax(vals, offs, PAD: tl.constexpr):
    """Row-wise max of vals [BM, X] and the lowest column index holding it."""
    best = tl.max(vals, axis=1)
    idx = tl.min(tl.where(vals == best[:, None], offs[None, :], PAD), axis=1)
    return best, idx


@triton.jit
def moe_gate_kernel(x_ptr, weight_ptr, bias_ptr, weights_ptr, ids_ptr, M, D, route_scale,
                    stride_x_m, stride_weight_e, stride_weights_m, stride_ids_m,
                    E: tl.constexpr, E_PAD: tl.constexpr, N_GROUPS: tl.constexpr, G_PAD: tl.constexpr,
                    TOPK_GROUPS: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NORM_TOPK_PROB: tl.constexpr = True):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_e = tl.arange(0, E_PAD)
    mask_e = offs_e < E
    # logits = x @ weight^T in fp32 (ieee: no tf32, routing is decided by small score differences)
    logits = tl.zeros((BLOCK_M, E_PAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_x_m + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        wt = tl.load(weight_ptr + offs_e[None, :].to(tl.int64) * stride_weight_e + offs_d[:, None],
                     mask=mask_e[None, :] & mask_d[:, None], other=0.0).to(tl.float32)  # [BLOCK_D, E_PAD]
        logits += tl.dot(xt, wt, input_precision="ieee")
    scores = tl.sigmoid(logits)
    bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    biased = tl.where(mask_e[None, :], scores + bias[None, :], float("-inf"))  # bias for selection only

    if N_GROUPS > 1:
        GROUP: tl.constexpr = E // N_GROUPS
        group_of = offs_e // GROUP
        offs_g = tl.arange(0, G_PAD)
        group_scores = tl.full((BLOCK_M, G_PAD), float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUPS):  # group score = sum of the group's top-2 biased scores
            vals = tl.where((group_of == g)[None, :], biased, float("-inf"))
            top1, first = _first_argmax(vals, offs_e, E_PAD)
            score = top1
            if GROUP > 1:
                score = top1 + tl.max(tl.where(offs_e[None, :] == first[:, None], float("-inf"), vals), axis=1)
            group_scores = tl.where(offs_g[None, :] == g, score[:, None], group_scores)
        kept = tl.zeros((BLOCK_M, G_PAD), dtype=tl.int32)
        for t in tl.static_range(TOPK_GROUPS):
            _, gi = _first_argmax(group_scores, offs_g, G_PAD)
            hit = offs_g[None, :] == gi[:, None]
            kept = tl.where(hit, 1, kept)
            group_scores = tl.where(hit, float("-inf"), group_scores)
        col_kept = tl.zeros((BLOCK_M, E_PAD), dtype=tl.int32)
        for g in tl.static_range(N_GROUPS):
            kg = tl.sum(tl.where(offs_g[None, :] == g, kept, 0), axis=1)
            col_kept = tl.where((group_of == g)[None, :], kg[:, None], col_kept)
        biased = tl.where(col_kept > 0, biased, float("-inf"))

    offs_k = tl.arange(0, TOPK_PAD)
    top_w = tl.zeros((BLOCK_M, TOPK_PAD), dtype=tl.float32)
    top_id = tl.zeros((BLOCK_M, TOPK_PAD), dtype=tl.int32)
    for t in tl.static_range(TOPK):
        _, idx = _first_argmax(biased, offs_e, E_PAD)
        sel = offs_e[None, :] == idx[:, None]
        w = tl.sum(tl.where(sel, scores, 0.0), axis=1)  # the unbiased score of the chosen expert
        biased = tl.where(sel, float("-inf"), biased)
        top_w = tl.where(offs_k[None, :] == t, w[:, None], top_w)
        top_id = tl.where(offs_k[None, :] == t, idx[:, None], top_id)
    if NORM_TOPK_PROB:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    top_w = top_w * route_scale
    mask_out = mask_m[:, None] & (offs_k[None, :] < TOPK)
    tl.store(weights_ptr + offs_m[:, None] * stride_weights_m + offs_k[None, :], top_w, mask=mask_out)
    tl.store(ids_ptr + offs_m[:, None] * stride_ids_m + offs_k[None, :], top_id.to(tl.int64), mask=mask_out)


def moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob=True, *, configs=None):
    m, e = x.shape[0], weight.shape[0]
    if e % n_groups or topk_groups > n_groups or topk > topk_groups * (e // n_groups):
        raise ContractError(f"moe_gate: E={e}, n_groups={n_groups}, topk_groups={topk_groups}, topk={topk} "
                            f"are inconsistent (need E % n_groups == 0 and topk <= topk_groups * E/n_groups)")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or bias.shape != (e,):
        raise ContractError(f"moe_gate: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)} "
                            f"must be [M, D], [E, D], [E]")
    out_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    weights = torch.empty(m, topk, dtype=torch.float32, device=x.device)
    ids = torch.empty(m, topk, dtype=torch.int64, device=x.device)
    if m:
        launch(moe_gate_kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),), configs or DEFAULT_CONFIGS,
               dict(x_ptr=x, weight_ptr=weight, bias_ptr=bias.contiguous(), weights_ptr=weights, ids_ptr=ids,
                    M=m, D=x.shape[1], route_scale=float(route_scale), stride_x_m=x.stride(0),
                    stride_weight_e=weight.stride(0), stride_weights_m=weights.stride(0), stride_ids_m=ids.stride(0),
                    E=e, E_PAD=max(16, triton.next_power_of_2(e)), N_GROUPS=n_groups,
                    G_PAD=triton.next_power_of_2(n_groups), TOPK_GROUPS=topk_groups, TOPK=topk,
                    TOPK_PAD=triton.next_power_of_2(topk), NORM_TOPK_PROB=bool(norm_topk_prob)))
    return weights.to(out_dtype), ids


def compile_specs(target):
    sig = {"x_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i64",
           "M": "i32", "D": "i32", "route_scale": "fp32", "stride_x_m": "i32", "stride_weight_e": "i32",
           "stride_weights_m": "i32", "stride_ids_m": "i32", **{k: "constexpr" for k in (
               "E", "E_PAD", "N_GROUPS", "G_PAD", "TOPK_GROUPS", "TOPK", "TOPK_PAD", "BLOCK_M", "BLOCK_D",
               "NORM_TOPK_PROB")}}
    consts = {"E": 256, "E_PAD": 256, "N_GROUPS": 8, "G_PAD": 8, "TOPK_GROUPS": 4, "TOPK": 8, "TOPK_PAD": 8,
              "BLOCK_M": 16, "BLOCK_D": 64, "NORM_TOPK_PROB": True}  # DeepSeek-V3's router
    forbid = (r"tf32",) if target.backend == "cuda" else (r"v_mfma\w*xf32",)  # the router stays in ieee fp32
    return [CompileSpec("moe_gate[v3]", moe_gate_kernel, sig, consts, {"num_warps": 4}, forbid=forbid)]
