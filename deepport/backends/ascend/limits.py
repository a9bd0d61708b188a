"""Documented limits of the fused torch_npu ops, checked before each call.

Each check returns None when the fused op accepts the inputs, else the reason it does not; ops.py then
takes the generic torch path and records that reason. Sources: op-plugin docs (torch_npu-<op>.md) and
shared/reference/hardware_specifics.md section B3.
"""
from __future__ import annotations

import torch

HALF = (torch.bfloat16, torch.float16)
FLOATS = (torch.bfloat16, torch.float16, torch.float32)
MLA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)  # query heads the MLA mode accepts; others are padded up to these
MLA_LATENT, MLA_ROPE = 512, 64
MLA_MAX_QUERY_S = 16
MLA_MAX_BLOCK = 1024
PREFILL_DK, PREFILL_DV = 192, (128, 192)  # TND layout without rope
MAX_BATCHES_TND = 4096
MAX_TOKENS_TND = 1 << 20
GATING_MAX_EXPERTS = 2048
GMM_MAX_GROUPS = 1024  # npu_grouped_matmul, single 3-D weight grouped along M: at most 1024 groups
GMM_INNER_LIMIT = 65536  # last dim of x and of each weight must stay below it


def norm(x: torch.Tensor) -> str | None:
    if x.dtype not in FLOATS:
        return f"dtype {x.dtype} (npu_rms_norm takes float16/bfloat16/float32)"
    return None if 1 <= x.dim() <= 8 else f"{x.dim()}-D input (npu_rms_norm takes 1 to 8 dims)"


def swiglu(x: torch.Tensor) -> str | None:
    return None if x.dtype in FLOATS else f"dtype {x.dtype} (npu_swiglu takes float16/bfloat16/float32)"


def interleave_rope(x: torch.Tensor) -> str | None:
    if x.dtype not in HALF:
        return f"dtype {x.dtype} (npu_interleave_rope takes bfloat16/float16)"
    if x.shape[-1] != MLA_ROPE:
        return f"rope dim {x.shape[-1]} (npu_interleave_rope needs D = 64)"
    return None


def gating_top_k(chip: str | None, n_experts: int, topk: int, topk_groups: int, n_groups: int) -> str | None:
    """npu_moe_gating_top_k limits; on 910B/910C only DeepSeek-V3's own routing shape is documented."""
    if n_experts > GATING_MAX_EXPERTS:
        return f"{n_experts} experts > {GATING_MAX_EXPERTS}"
    group = n_experts // n_groups
    if group <= 2:
        return f"group size {group} (npu_moe_gating_top_k needs more than 2 experts per group)"
    if -(-group // 32) * 32 * n_groups > GATING_MAX_EXPERTS:
        return "32-aligned group size x group_count > 2048"
    a2_a3 = chip in ("910B", "910C", None)  # unknown chip: assume the stricter A2/A3 limits
    if a2_a3 and ((n_experts, n_groups, topk_groups) != (256, 8, 4) or topk > 32):
        return (f"Ascend {chip or 'A2/A3'} supports 256 experts, group_count=8, k_group=4, k<=32 only "
                f"(got {n_experts}, {n_groups}, {topk_groups}, {topk})")
    return None


def padded_heads(h: int) -> int | None:
    """The smallest MLA head count >= h, or None when h exceeds 128."""
    return next((n for n in MLA_HEADS if n >= h), None)


def mla_decode(q_latent, q_pe, kv_cache, pe_cache) -> str | None:
    """npu_fused_infer_attention_score MLA mode (query_rope/key_rope, PageAttention, BSND)."""
    if q_latent.dtype not in HALF or not (q_pe.dtype == kv_cache.dtype == pe_cache.dtype == q_latent.dtype):
        return f"dtypes {q_latent.dtype}/{kv_cache.dtype} (MLA mode takes one of bfloat16/float16)"
    b, s, h, c = q_latent.shape
    if c != MLA_LATENT or q_pe.shape[-1] != MLA_ROPE:
        return f"latent/rope dims {c}/{q_pe.shape[-1]} (MLA mode needs 512/64)"
    if not 1 <= s <= MLA_MAX_QUERY_S:
        return f"{s} query tokens per sequence (MLA mode takes 1..16)"
    if padded_heads(h) is None:
        return f"{h} heads (MLA mode takes at most 128)"
    p = kv_cache.shape[1]
    if p % 16 or p > MLA_MAX_BLOCK:
        return f"block size {p} (MLA mode needs a multiple of 16, at most {MLA_MAX_BLOCK})"
    return None


def mla_prefill(q, k, v, causal: bool) -> str | None:
    """npu_fused_infer_attention_score TND layout without rope (MLA's up-projected prefill)."""
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        return f"dtype {q.dtype} (TND without rope takes bfloat16 only)"
    b, s, h, dk = q.shape
    t, dv = k.shape[1], v.shape[-1]
    if dk != PREFILL_DK or dv not in PREFILL_DV:
        return f"head dims {dk}/{dv} (TND without rope needs Dk = 192, Dv = 128 or 192)"
    if b > MAX_BATCHES_TND or b * max(s, t) > MAX_TOKENS_TND:
        return f"batch {b} x {max(s, t)} tokens (TND takes at most 4096 batches and 1M tokens)"
    if causal and s > t:
        return f"S={s} > T={t}"
    return None


def moe_experts(x, w1, w2, w3) -> str | None:
    """npu_moe_init_routing_v2 + npu_grouped_matmul + npu_moe_token_unpermute, unquantised."""
    if x.dtype not in HALF:
        return f"dtype {x.dtype} (npu_grouped_matmul path runs bfloat16/float16)"
    if not all(isinstance(w, torch.Tensor) and w.dtype == x.dtype for w in (w1, w2, w3)):
        return "fp8 or mixed-dtype expert weights (the fused path is unquantised; W8A8 runs generic torch)"
    if x.shape[0] * x.shape[1] >= 1 << 24:
        return "x has 2^24 elements or more (npu_moe_init_routing_v2 limit)"
    if w1.shape[0] > GMM_MAX_GROUPS:
        return f"{w1.shape[0]} experts on this rank (npu_grouped_matmul takes at most {GMM_MAX_GROUPS} groups)"
    if max(w1.shape[1], w1.shape[2]) >= GMM_INNER_LIMIT:
        return f"expert dims {tuple(w1.shape[1:])} reach npu_grouped_matmul's inner limit {GMM_INNER_LIMIT}"
    return None
