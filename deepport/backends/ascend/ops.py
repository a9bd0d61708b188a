"""ascend ops: the contracts bound to torch_npu fused ops, each with its chip limits checked before the call.

Outside those limits (dtype, head dims, block size, routing shape) an op runs the named generic torch
implementation on the npu device instead: cpu_ref's plain-torch code, the executable spec, which runs on
any device. sample and the collectives are torch_common's torch-native versions (hccl process groups).
`PROVENANCE` says what each op is bound to; `paths()` counts which path each call actually took and
`last_reason` says why the last generic call left the fused op.
"""
from __future__ import annotations

import inspect
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
import torch_npu

from deepport.backends import torch_common
from deepport.backends.ascend import dtype_policy, limits
from deepport.backends.cpu_ref import ops as generic
from deepport.core import preconditions
from deepport.core.errors import ContractError

GENERIC = "generic torch"
PROVENANCE: dict[str, str] = {
    "rms_norm": "torch_npu.npu_rms_norm / torch_npu.npu_add_rms_norm",
    "rope": "torch_npu.npu_interleave_rope",
    "mla_prefill": "torch_npu.npu_fused_infer_attention_score (TND)",
    "mla_decode": "torch_npu.npu_fused_infer_attention_score (MLA, paged)",
    "moe_gate": "torch_npu.npu_moe_gating_top_k",
    "moe_experts": "torch_npu.npu_moe_init_routing_v2 + npu_grouped_matmul + npu_moe_token_unpermute",
    "silu_mul": "torch_npu.npu_swiglu",
    "act_quant": GENERIC,
    "weight_dequant": GENERIC,
    "fp8_gemm": GENERIC,
    "sample": "torch native (deepport.backends.torch_common)",
    "all_reduce": "torch.distributed on hccl (deepport.backends.torch_common)",
    "all_to_all": "torch.distributed on hccl (deepport.backends.torch_common)",
}
# ops whose generic implementation is the only one (no torch_npu kernel fits the contract)
GENERIC_ONLY = {
    "act_quant": "1x128 fp8 activation quantisation: npu_dynamic_block_quant is int8-only on 910B/910C",
    "weight_dequant": "block fp8 dequantisation: plain torch (910B/910C checkpoints are dequantised at load)",
    "fp8_gemm": "block-scaled fp8 GEMM: Ascend 950 fp8 matmul is not bound yet (unverified on hardware)",
}

_paths: Counter = Counter()
last_reason: dict[str, str] = {}
_masks: dict = {}


def paths() -> dict[tuple[str, str], int]:
    """Calls per (op, path) since the last reset: path is the torch_npu op's name or 'generic torch'."""
    return dict(_paths)


def reset_paths() -> None:
    _paths.clear()
    last_reason.clear()


def _fused(op: str, name: str) -> None:
    _paths[(op, name)] += 1


def _generic(op: str, why: str) -> None:
    """A call outside the fused op's limits runs the generic torch path: count it and say so once per reason."""
    _paths[(op, GENERIC)] += 1
    if last_reason.get(op) != why:
        warnings.warn(f"deepport ascend: {op} runs the generic torch path, not {PROVENANCE[op]}: {why}",
                      RuntimeWarning, stacklevel=3)
    last_reason[op] = why


def _causal_mask(device) -> torch.Tensor:
    """The "optimised" 2048x2048 mask sparse_mode=3 takes: 1 strictly above the diagonal (masked out)."""
    key = str(device)
    if key not in _masks:
        _masks[key] = torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)
    return _masks[key]


def rms_norm(x, weight, eps, residual=None):
    if x.shape[-1] != weight.shape[0]:
        raise ContractError(f"rms_norm: x last dim {x.shape[-1]} != weight dim {weight.shape[0]}")
    if residual is not None and residual.shape != x.shape:
        raise ContractError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    why = limits.norm(x) or (residual is not None and residual.dtype != x.dtype and "residual dtype differs") or None
    if why:
        _generic("rms_norm", why)
        return generic.rms_norm(x, weight, eps, residual)
    gamma = weight.to(x.dtype)
    if residual is None:
        _fused("rms_norm", "npu_rms_norm")
        y, _rstd = torch_npu.npu_rms_norm(x, gamma, epsilon=eps)
        return y
    _fused("rms_norm", "npu_add_rms_norm")
    y, _rstd, r = torch_npu.npu_add_rms_norm(x, residual, gamma, epsilon=eps)
    return y, r


def rope(x, cos, sin):
    r = x.shape[-1]
    if r % 2 or cos.shape[-1] != r // 2 or sin.shape != cos.shape:
        raise ContractError(f"rope: x rope dim {r} must be even and cos/sin last dim {r // 2}; "
                            f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    why = limits.interleave_rope(x)
    if why:
        _generic("rope", why)
        return generic.rope(x, cos, sin)
    _fused("rope", "npu_interleave_rope")
    # [B, S, H, R] -> (B, N, S, D); cos/sin [B, S, R/2] -> (B, 1, S, D) in the rotate-half layout
    xt = x.transpose(1, 2).contiguous()
    c = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(x.dtype).contiguous()
    s = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(x.dtype).contiguous()
    out = torch_npu.npu_interleave_rope(xt, c, s)  # de-interleaved: [even pairs' results ; odd pairs' results]
    # re-interleave so q, k and the cache keep the checkpoint's pairwise convention (the contract's layout)
    out = out.unflatten(-1, (2, r // 2)).transpose(-1, -2).flatten(-2)
    return out.transpose(1, 2).contiguous()


def mla_prefill(q, k, v, causal, scale):
    preconditions.mla_prefill(q, k, v, causal)
    b, s, h, dk = q.shape
    t = k.shape[1]
    why = limits.mla_prefill(q, k, v, causal)
    if why:
        _generic("mla_prefill", why)
        return generic.mla_prefill(q, k, v, causal, scale)
    _fused("mla_prefill", "npu_fused_infer_attention_score")
    dv = v.shape[-1]
    kw = dict(actual_seq_lengths=[s * (i + 1) for i in range(b)], actual_seq_lengths_kv=[t * (i + 1) for i in range(b)],
              num_heads=h, num_key_value_heads=h, scale=float(scale), input_layout="TND", sparse_mode=0)
    if causal:  # rightDownCausal = the contract's bottom-right-aligned causal mask
        kw.update(sparse_mode=3, atten_mask=_causal_mask(q.device))
    out, _lse = torch_npu.npu_fused_infer_attention_score(
        q.reshape(b * s, h, dk).contiguous(), k.reshape(b * t, h, dk).contiguous(),
        v.reshape(b * t, h, dv).contiguous(), **kw)
    return out.view(b, s, h, dv)


def mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    preconditions.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens)
    b, s, h, c = q_latent.shape
    why = limits.mla_decode(q_latent, q_pe, kv_cache, pe_cache)
    if why:
        _generic("mla_decode", why)
        return generic.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale)
    lens = [int(n) for n in seq_lens.tolist()]  # actual_seq_lengths_kv is a host list (one sync per step)
    p = kv_cache.shape[1]
    preconditions.mla_decode_lengths(lens, s, block_table.shape[1] * p)
    _fused("mla_decode", "npu_fused_infer_attention_score")
    hp = limits.padded_heads(h)
    q, qr = q_latent, q_pe
    if hp != h:  # pad heads up to an accepted count; padded heads attend uniformly and are dropped
        q, qr = F.pad(q, (0, 0, 0, hp - h)), F.pad(qr, (0, 0, 0, hp - h))
    kw = dict(query_rope=qr.contiguous(), key_rope=pe_cache, block_table=block_table.to(torch.int32),
              block_size=p, actual_seq_lengths_kv=lens, num_heads=hp, num_key_value_heads=1, scale=float(scale),
              input_layout="BSND", sparse_mode=0)
    if s > 1:  # MTP / chunked decode: causal among the S new tokens, bottom-right aligned
        kw.update(sparse_mode=3, atten_mask=_causal_mask(q.device), actual_seq_lengths=[s] * b)
    out, _lse = torch_npu.npu_fused_infer_attention_score(q.contiguous(), kv_cache, kv_cache, **kw)
    return out if hp == h else out[:, :, :h].contiguous()


def moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob=True):
    e = weight.shape[0]
    preconditions.moe_gate(e, n_groups, topk_groups, topk)
    why = limits.gating_top_k(dtype_policy.current_chip(), e, topk, topk_groups, n_groups)
    if why or x.dtype == torch.float64:
        _generic("moe_gate", why or "float64 inputs")
        return generic.moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob)
    _fused("moe_gate", "npu_moe_gating_top_k")
    logits = F.linear(x.float(), weight.float())  # [M, E] fp32: the router GEMM stays in torch
    # The op always renormalises its sigmoid top-k (y / (sum y + eps) * routed_scaling_factor). Without
    # norm_topk_prob, take the selection from it and the weights from its normOut output (out_flag=True:
    # sigmoid(x) for every expert, before the bias).
    w, ids, norm_out = torch_npu.npu_moe_gating_top_k(
        logits, topk, bias=bias.float(), k_group=topk_groups, group_count=n_groups, group_select_mode=1,
        renorm=0, norm_type=1, out_flag=not norm_topk_prob, routed_scaling_factor=float(route_scale), eps=1e-20)
    ids = ids.long()
    if not norm_topk_prob:
        return norm_out.float().gather(1, ids) * float(route_scale), ids
    return w.float(), ids


def moe_experts(x, topk_weights, topk_ids, w1, w2, w3):
    preconditions.moe_experts(x, topk_weights, topk_ids, w1, w2, w3)
    m, d = x.shape
    why = limits.moe_experts(x, w1, w2, w3)
    if why:
        _generic("moe_experts", why)
        return generic.moe_experts(x, topk_weights, topk_ids, w1, w2, w3)
    _fused("moe_experts", "npu_moe_init_routing_v2+npu_grouped_matmul+npu_moe_token_unpermute")
    k, e = topk_ids.shape[1], w1.shape[0]
    # ids < 0 (experts on another rank) contribute nothing: route them to expert 0 with weight 0
    valid = topk_ids >= 0
    ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).to(torch.int32)
    probs = torch.where(valid, topk_weights.float(), torch.zeros_like(topk_weights, dtype=torch.float32))
    expanded_x, expanded_row_idx, tokens_per_expert, _scale = torch_npu.npu_moe_init_routing_v2(
        x, ids, active_num=m * k, expert_num=e, expert_tokens_num_type=1, expert_tokens_num_flag=True,
        active_expert_range=[0, e], quant_mode=-1, row_idx_type=0, drop_pad_mode=0)
    gmm = dict(group_list=tokens_per_expert, group_list_type=1, group_type=0, split_item=2)
    # weights [E, N, K] (checkpoint layout) -> [E, K, N] views: grouped matmul computes x @ w per group
    gate = torch_npu.npu_grouped_matmul([expanded_x], [w1.transpose(1, 2)], **gmm)[0]
    up = torch_npu.npu_grouped_matmul([expanded_x], [w3.transpose(1, 2)], **gmm)[0]
    h = torch_npu.npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)  # gate first; rounded to x.dtype
    y = torch_npu.npu_grouped_matmul([h], [w2.transpose(1, 2)], **gmm)[0]  # [M*k, D] in x.dtype
    # weighted sum in fp32 (permuted rows and probs share fp32), rounded once to x.dtype
    out = torch_npu.npu_moe_token_unpermute(y.float(), expanded_row_idx, probs=probs)
    return out.to(x.dtype)


def silu_mul(x):
    if x.shape[-1] % 2:
        raise ContractError(f"silu_mul: last dim {x.shape[-1]} must be even ([gate ; up])")
    why = limits.swiglu(x)
    if why:
        _generic("silu_mul", why)
        return generic.silu_mul(x)
    _fused("silu_mul", "npu_swiglu")
    return torch_npu.npu_swiglu(x, dim=-1)


def _generic_only(op: str):
    fn = getattr(generic, op)

    def call(*args, **kwargs):
        _paths[(op, GENERIC)] += 1
        return fn(*args, **kwargs)

    call.__name__ = op
    call.__signature__ = inspect.signature(fn)
    call.__doc__ = f"{GENERIC_ONLY[op]} (deepport.backends.cpu_ref.ops.{op} on the npu device)"
    return call


act_quant = _generic_only("act_quant")
weight_dequant = _generic_only("weight_dequant")
fp8_gemm = _generic_only("fp8_gemm")
sample = torch_common.sample  # torch-native on the tensors' device; the group is hccl on Ascend
all_reduce = torch_common.all_reduce
all_to_all = torch_common.all_to_all

OPS = {name: globals()[name] for name in PROVENANCE}


def load() -> dict:
    return dict(OPS)
