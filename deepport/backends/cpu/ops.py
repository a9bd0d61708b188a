"""cpu: every op contract written for speed on x86 and ARM CPUs with torch's own kernels.

Few, large torch calls per op (a 12M-parameter model's decode is bound by per-op overhead, a 671B's by
weight streaming): SDPA for prefill, one batched gather + two bmm for paged decode (no per-sequence loop,
no host synchronisation), MoE over all experts at once when the tokens touch most of them and over
gathered (token, expert) pairs when they touch few, sorted groups only for large M. Math in fp32 as the
contracts say; bf16 values are upcast (torch's bf16 GEMM where the CPU has native bf16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deepport.backends.torch_common import all_reduce, all_to_all, sample
from deepport.core import preconditions
from deepport.core.errors import ContractError
from deepport.core.formats import (AMAX_FLOOR, Fp8Weight, check_scale_fmt, dequantize_weight, is_fp8,
                                   round_scale_up_pow2, scale_grid)

__all__ = ["rms_norm", "rope", "act_quant", "weight_dequant", "fp8_gemm", "linear", "mla_prefill", "mla_decode",
           "moe_gate", "moe_experts", "silu_mul", "sample", "all_reduce", "all_to_all"]

F32 = torch.float32


def rms_norm(x, weight, eps, residual=None):
    d = x.shape[-1]
    if d != weight.shape[0]:
        raise ContractError(f"rms_norm: x last dim {d} != weight dim {weight.shape[0]}")
    if residual is not None and residual.shape != x.shape:
        raise ContractError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if x.dtype == F32:
        r = x if residual is None else x + residual
        y = F.rms_norm(r, (d,), weight if weight.dtype == F32 else weight.float(), eps)
        return y if residual is None else (y, r)
    r = x if residual is None else (x.float() + residual.float()).to(x.dtype)  # r rounded once, after the fp32 add
    y = F.rms_norm(r.float(), (d,), weight.float(), eps).to(x.dtype)
    return y if residual is None else (y, r)


def rope(x, cos, sin):
    r = x.shape[-1]
    if r % 2 or cos.shape[-1] != r // 2 or sin.shape != cos.shape:
        raise ContractError(f"rope: x rope dim {r} must be even and cos/sin last dim {r // 2}; "
                            f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    # interleaved pairs are complex numbers: one complex product per pair
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], r // 2, 2))  # [B, S, H, R/2]
    rot = torch.complex(cos.float(), sin.float()).unsqueeze(-2)  # [B, S, 1, R/2]
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def act_quant(x, fmt, block=128, scale_fmt="fp32"):
    k = x.shape[-1]
    if k % block:
        raise ContractError(f"act_quant: last dim {k} is not a multiple of the block {block}; pad K to a multiple of {block}")
    check_scale_fmt(scale_fmt, "act_quant")
    xb = x.float().unflatten(-1, (k // block, block))
    s = xb.abs().amax(-1).clamp_(min=AMAX_FLOOR).div_(fmt.act_max)
    if scale_fmt == "ue8m0":
        s = round_scale_up_pow2(s)
    codes = (xb / s.unsqueeze(-1)).to(fmt.dtype).flatten(-2)
    return codes, s


def weight_dequant(w, scale_inv, block=128, out_dtype=torch.bfloat16):
    if not is_fp8(w) or w.dim() != 2:
        raise ContractError(f"weight_dequant: w must be a 2-D fp8 tensor, got {w.dtype} {tuple(w.shape)}")
    want = scale_grid(*w.shape, block)
    if tuple(scale_inv.shape) != want:
        raise ContractError(f"weight_dequant: scale_inv shape {tuple(scale_inv.shape)} != {want} "
                            f"(ceil(N/{block}), ceil(K/{block})) for w {tuple(w.shape)}")
    return dequantize_weight(w, scale_inv, block, out_dtype)


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    m, k = a.shape
    n = b.shape[0]
    if not (is_fp8(a) and is_fp8(b)) or a.dtype != b.dtype:
        raise ContractError(f"fp8_gemm: a and b must share one fp8 dtype, got {a.dtype} and {b.dtype}")
    if k % 128 or b.shape[1] != k:
        raise ContractError(f"fp8_gemm: K must match and be a multiple of 128; a {tuple(a.shape)}, b {tuple(b.shape)}")
    if tuple(a_scale.shape) != (m, k // 128) or tuple(b_scale.shape) != scale_grid(n, k):
        raise ContractError(f"fp8_gemm: scales {tuple(a_scale.shape)} / {tuple(b_scale.shape)} do not match "
                            f"a [M, K/128] = {(m, k // 128)} / b [ceil(N/128), K/128] = {scale_grid(n, k)}")
    acc = torch.float64 if out_dtype == torch.float64 else F32
    kb = k // 128
    # per K block: exact fp32 dot products of fp8 codes (products of two e4m3 values fit fp32), one bmm
    partial = torch.bmm(a.to(acc).view(m, kb, 128).transpose(0, 1), b.to(acc).view(n, kb, 128).permute(1, 2, 0))
    bs = b_scale.to(acc).repeat_interleave(128, dim=0)[:n].t()  # [KB, N]
    c = (partial * a_scale.to(acc).t().unsqueeze(-1) * bs.unsqueeze(1)).sum(0)  # [M, N]
    return c.to(out_dtype)


def _fp8_linear(x, w: Fp8Weight):
    lead, k = x.shape[:-1], x.shape[-1]
    codes, s = act_quant(x.reshape(-1, k), w.fmt, 128, w.scale_fmt)
    y = fp8_gemm(codes, s, w.weight, w.scale_inv, out_dtype=x.dtype)
    return y.reshape(*lead, y.shape[-1])


def linear(x, w):
    if isinstance(w, Fp8Weight):
        return _fp8_linear(x, w)
    return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))


def _bottom_right_mask(s, t, device):
    """True where query i (of S) may see key j: j <= (T - S) + i."""
    i = torch.arange(s, device=device).unsqueeze(1)
    j = torch.arange(t, device=device).unsqueeze(0)
    return j <= (t - s) + i


def mla_prefill(q, k, v, causal, scale):
    preconditions.mla_prefill(q, k, v, causal)
    s, t = q.shape[1], k.shape[1]
    qf, kf, vf = (z.transpose(1, 2) if z.dtype == F32 else z.float().transpose(1, 2) for z in (q, k, v))
    if causal and s == t:
        out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale)
    else:
        mask = _bottom_right_mask(s, t, q.device) if causal else None
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).to(q.dtype)  # [B, S, H, Dv]


def mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    preconditions.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens)
    b, s, h, c = q_latent.shape
    nb, p = kv_cache.shape[:2]
    t = block_table.shape[1] * p
    # every row's whole block-table row in one gather; entries past a row's length are masked (ids clamped
    # so any value is safe to index, rows zeroed so NaN/inf there cannot leak through 0 * x)
    blocks = block_table.long().clamp(0, nb - 1)
    j = torch.arange(t, device=q_latent.device)
    valid = j.unsqueeze(0) < seq_lens.unsqueeze(1).long()  # [B, T]
    ckv = kv_cache[blocks].view(b, t, c)
    cpe = pe_cache[blocks].view(b, t, -1)
    if ckv.dtype != F32:
        ckv, cpe = ckv.float(), cpe.float()
    ckv = ckv.masked_fill(~valid.unsqueeze(-1), 0.0)
    cpe = cpe.masked_fill(~valid.unsqueeze(-1), 0.0)
    ql = q_latent.reshape(b, s * h, c)
    qp = q_pe.reshape(b, s * h, -1)
    if ql.dtype != F32:
        ql, qp = ql.float(), qp.float()
    scores = torch.baddbmm(torch.bmm(qp, cpe.transpose(1, 2)), ql, ckv.transpose(1, 2), alpha=scale, beta=scale)
    # query i of S sits at position L - S + i: causal among the new tokens, nothing past L
    qpos = seq_lens.long().unsqueeze(1) - s + torch.arange(s, device=q_latent.device).unsqueeze(0)  # [B, S]
    allowed = j.view(1, 1, t) <= qpos.unsqueeze(-1)  # [B, S, T]
    scores = scores.view(b, s, h, t).masked_fill(~allowed.unsqueeze(2), float("-inf"))
    out = torch.bmm(scores.softmax(-1).view(b, s * h, t), ckv)
    return out.view(b, s, h, c).to(q_latent.dtype)


def moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob=True):
    m, e = x.shape[0], weight.shape[0]
    preconditions.moe_gate(e, n_groups, topk_groups, topk)
    xf = x if x.dtype == F32 else x.float()
    scores = torch.sigmoid(F.linear(xf, weight if weight.dtype == F32 else weight.float()))  # [M, E]
    biased = scores + bias.float()
    if n_groups > 1:
        grouped = biased.view(m, n_groups, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # top-2 sum per group
        keep = group_scores.topk(topk_groups, dim=-1).indices
        drop = torch.ones(m, n_groups, dtype=torch.bool, device=x.device).scatter_(1, keep, False)
        biased = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).view(m, e)
    ids = biased.topk(topk, dim=-1).indices
    w = scores.gather(1, ids)
    return (w * (route_scale / w.sum(-1, keepdim=True)) if norm_topk_prob else w * route_scale), ids


# MoE strategy by how many experts the tokens touch. Decode is bound by reading weights (fp32 experts of the
# embedded model already overflow L2): touching most experts -> all experts in three GEMMs (sync-free);
# touching few -> one GEMM per touched expert on views of the stacked weights (reads only those experts;
# reads the counts on the host, free on a CPU), or, while torch.compile traces, gathered per-pair weights
# (sync-free, but the gather copies each expert it reads). Dense is capped at _DENSE_MAX_M tokens.
_PAIR_MAX = 64
_DENSE_MAX_M = 64


def _experts_dense(x, topk_weights, topk_ids, w1, w2, w3):
    """Every expert on every token (one GEMM each for gate, up, down), weighted by a dense [M, E] routing matrix."""
    m, d = x.shape
    e, i = w1.shape[:2]
    gate = F.linear(x, w1.view(e * i, d)).view(m, e, i)
    up = F.linear(x, w3.view(e * i, d)).view(m, e, i)
    h = silu_mul(torch.cat((gate, up), dim=-1)) if x.dtype != F32 else F.silu(gate) * up  # [M, E, I]
    y = torch.bmm(h.transpose(0, 1), w2.transpose(1, 2))  # [E, M, D]
    route = torch.zeros(m, e, dtype=F32, device=x.device)
    route.scatter_add_(1, topk_ids.clamp(min=0), topk_weights.float() * (topk_ids >= 0))
    return (y.float() * route.t().unsqueeze(-1)).sum(0)  # [M, D], fp32 accumulation


def _experts_pairs(x, topk_weights, topk_ids, w1, w2, w3):
    """Each (token, expert) pair's weights gathered, batched GEMVs: reads only the experts in use."""
    m, d = x.shape
    k = topk_ids.shape[1]
    ids = topk_ids.flatten().clamp(min=0)
    xs = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [P, D, 1]
    gate = torch.bmm(w1[ids], xs).squeeze(-1)  # [P, I]
    up = torch.bmm(w3[ids], xs).squeeze(-1)
    h = silu_mul(torch.cat((gate, up), dim=-1)) if x.dtype != F32 else F.silu(gate) * up
    o = torch.bmm(w2[ids], h.unsqueeze(-1)).squeeze(-1)  # [P, D]
    wk = (topk_weights.float() * (topk_ids >= 0)).view(m, 1, k)
    return torch.bmm(wk, o.view(m, k, d).float()).squeeze(1)


def _experts_grouped(x, topk_weights, topk_ids, w1, w2, w3):
    """Tokens sorted by expert, one GEMM per touched expert (prefill-sized M; reads the counts on the host)."""
    m, d = x.shape
    k = topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat.clamp(min=-1) + 1, minlength=w1.shape[0] + 1).tolist()
    tok = order // k
    xs = x[tok]
    wsorted = topk_weights.flatten()[order].float().unsqueeze(-1)
    y = torch.zeros(m, d, dtype=F32, device=x.device)
    start = counts[0]  # ids < 0 sort first and contribute nothing
    for e, cnt in enumerate(counts[1:]):
        if cnt:
            sl = slice(start, start + cnt)
            xe = xs[sl]
            h = silu_mul(torch.cat((linear(xe, w1[e]), linear(xe, w3[e])), dim=-1))
            y.index_add_(0, tok[sl], linear(h, w2[e]).float() * wsorted[sl])
            start += cnt
    return y


def moe_experts(x, topk_weights, topk_ids, w1, w2, w3):
    preconditions.moe_experts(x, topk_weights, topk_ids, w1, w2, w3)
    m, pairs, e = x.shape[0], topk_ids.numel(), w1.shape[0]
    if isinstance(w1, Fp8Weight):
        y = _experts_grouped(x, topk_weights, topk_ids, w1, w2, w3)
    elif 2 * pairs >= e and m <= _DENSE_MAX_M:
        y = _experts_dense(x, topk_weights, topk_ids, w1, w2, w3)
    elif pairs <= _PAIR_MAX and torch.compiler.is_compiling():
        y = _experts_pairs(x, topk_weights, topk_ids, w1, w2, w3)
    else:
        y = _experts_grouped(x, topk_weights, topk_ids, w1, w2, w3)
    return y.to(x.dtype)


def silu_mul(x):
    if x.shape[-1] % 2:
        raise ContractError(f"silu_mul: last dim {x.shape[-1]} must be even ([gate ; up])")
    g, u = (x if x.dtype == F32 else x.float()).chunk(2, dim=-1)
    return (F.silu(g) * u).to(x.dtype)
