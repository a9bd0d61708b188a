"""Contract preconditions shared by every implementation (cpu_ref, ascend, plugins): one message per violation.

Each check raises ContractError naming the shapes it saw and the shapes the contract in core/ops.py wants.
"""
from __future__ import annotations

from deepport.core.errors import ContractError
from deepport.core.formats import is_fp8, scale_grid


def mla_prefill(q, k, v, causal) -> None:
    b, s, h, dk = q.shape
    t = k.shape[1]
    if k.shape != (b, t, h, dk) or v.shape[:3] != (b, t, h):
        raise ContractError(f"mla_prefill: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                            f"do not match q [B,S,H,Dk], k [B,T,H,Dk], v [B,T,H,Dv]")
    if causal and t < s:
        raise ContractError(f"mla_prefill: causal attention needs T >= S, got T={t}, S={s}")


def mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens) -> None:
    b, s, h, c = q_latent.shape
    if q_pe.shape[:3] != (b, s, h) or kv_cache.shape[-1] != c or pe_cache.shape[-1] != q_pe.shape[-1]:
        raise ContractError(f"mla_decode: q_latent {tuple(q_latent.shape)}, q_pe {tuple(q_pe.shape)}, "
                            f"kv_cache {tuple(kv_cache.shape)}, pe_cache {tuple(pe_cache.shape)} are inconsistent")
    if block_table.shape[0] != b or seq_lens.shape != (b,):
        raise ContractError(f"mla_decode: block_table {tuple(block_table.shape)} / seq_lens {tuple(seq_lens.shape)} "
                            f"must have B={b} rows")


def mla_decode_lengths(lens, s, capacity) -> None:
    """Host-side lengths: every sequence holds its S new tokens and fits its block-table row (capacity rows)."""
    for i, n in enumerate(lens):
        if n < s or n > capacity:
            raise ContractError(f"mla_decode: seq_lens[{i}]={n} must be in [S={s}, max_blocks*P]")


def moe_gate(e, n_groups, topk_groups, topk) -> None:
    if e % n_groups or topk_groups > n_groups or topk > topk_groups * (e // n_groups):
        raise ContractError(f"moe_gate: E={e}, n_groups={n_groups}, topk_groups={topk_groups}, topk={topk} "
                            f"are inconsistent (need E % n_groups == 0 and topk <= topk_groups * E/n_groups)")


def moe_experts(x, topk_weights, topk_ids, w1, w2, w3) -> None:
    m, d = x.shape
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != m:
        raise ContractError(f"moe_experts: topk_weights {tuple(topk_weights.shape)} and topk_ids "
                            f"{tuple(topk_ids.shape)} must both be [M={m}, k]")
    if w1.shape[-1] != d or w2.shape[-2] != d or w1.shape != w3.shape:
        raise ContractError(f"moe_experts: w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)} must be [E, I, D={d}] and "
                            f"w2 {tuple(w2.shape)} [E, D, I]")


def fp8_gemm(a, a_scale, b, b_scale) -> None:
    m, k = a.shape
    n = b.shape[0]
    if not (is_fp8(a) and is_fp8(b)) or a.dtype != b.dtype:
        raise ContractError(f"fp8_gemm: a and b must share one fp8 dtype, got {a.dtype} and {b.dtype}")
    if k % 128 or b.shape[1] != k:
        raise ContractError(f"fp8_gemm: K must match and be a multiple of 128; a {tuple(a.shape)}, b {tuple(b.shape)}")
    if tuple(a_scale.shape) != (m, k // 128) or tuple(b_scale.shape) != scale_grid(n, k):
        raise ContractError(f"fp8_gemm: scales {tuple(a_scale.shape)} / {tuple(b_scale.shape)} do not match "
                            f"a [M, K/128] = {(m, k // 128)} / b [ceil(N/128), K/128] = {scale_grid(n, k)}")
