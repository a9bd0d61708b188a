"""Reference implementations of every contract in deepport/core/ops.py: plain torch, fp32 math.

fp64 inputs are computed in fp64 (the conformance suite uses that for expected values). Everything
here runs on any torch device, so it also serves as the fallback of other backends. Differentiable
where the graph needs it (training goes through these ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deepport.core import preconditions
from deepport.core.errors import ContractError
from deepport.core.formats import (AMAX_FLOOR, Fp8Format, Fp8Weight, check_scale_fmt, dequantize_weight, is_fp8,
                                   round_scale_up_pow2, scale_grid)


def _acc(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def rms_norm(x, weight, eps, residual=None):
    if x.shape[-1] != weight.shape[0]:
        raise ContractError(f"rms_norm: x last dim {x.shape[-1]} != weight dim {weight.shape[0]}")
    acc = _acc(x)
    if residual is not None:
        if residual.shape != x.shape:
            raise ContractError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        r = (x.to(acc) + residual.to(acc)).to(x.dtype)
        xf = r.to(acc)
    else:
        r, xf = None, x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)
    y = y.to(x.dtype)
    return y if residual is None else (y, r)


def rope(x, cos, sin):
    r = x.shape[-1]
    if r % 2 or cos.shape[-1] != r // 2 or sin.shape != cos.shape:
        raise ContractError(f"rope: x rope dim {r} must be even and cos/sin last dim {r // 2}; "
                            f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    acc = _acc(x, cos)
    xf = x.to(acc).unflatten(-1, (r // 2, 2))
    c, s = cos.to(acc).unsqueeze(-2), sin.to(acc).unsqueeze(-2)  # [B, S, 1, R/2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def act_quant(x, fmt: Fp8Format, block=128, scale_fmt="fp32"):
    k = x.shape[-1]
    if k % block:
        raise ContractError(f"act_quant: last dim {k} is not a multiple of the block {block}; pad K to a multiple of {block}")
    check_scale_fmt(scale_fmt, "act_quant")
    acc = _acc(x)
    xb = x.to(acc).unflatten(-1, (k // block, block))
    amax = xb.abs().amax(-1)
    s = (torch.clamp(amax, min=AMAX_FLOOR) / fmt.act_max).float()
    if scale_fmt == "ue8m0":
        s = round_scale_up_pow2(s)
    codes = (xb / s.to(acc).unsqueeze(-1)).float().to(fmt.dtype).flatten(-2)
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
    preconditions.fp8_gemm(a, a_scale, b, b_scale)
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    kb = k // 128
    af = a.to(acc).view(m, kb, 128)
    bf = b.to(acc).view(n, kb, 128)
    partial = torch.einsum("mbk,nbk->mnb", af, bf)  # per-K-block dot products, exact in fp32 for fp8 inputs
    bs = b_scale.to(acc).repeat_interleave(128, dim=0)[:n]  # [N, KB]
    c = (partial * a_scale.to(acc).unsqueeze(1) * bs.unsqueeze(0)).sum(-1)
    return c.to(out_dtype)


def linear(x, w):
    if isinstance(w, Fp8Weight):
        lead, k = x.shape[:-1], x.shape[-1]
        codes, s = act_quant(x.reshape(-1, k), w.fmt, 128, w.scale_fmt)
        y = fp8_gemm(codes, s, w.weight, w.scale_inv, out_dtype=x.dtype)
        return y.reshape(*lead, y.shape[-1])
    return F.linear(x, w.to(x.dtype))


def mla_prefill(q, k, v, causal, scale):
    preconditions.mla_prefill(q, k, v, causal)
    s, t = q.shape[1], k.shape[1]
    acc = _acc(q, k, v)
    scores = torch.einsum("bshd,bthd->bhst", q.to(acc), k.to(acc)) * scale
    if causal:
        i = torch.arange(s, device=q.device).unsqueeze(1)
        j = torch.arange(t, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(j > (t - s) + i, float("-inf"))
    p = scores.softmax(dim=-1)
    out = torch.einsum("bhst,bthd->bshd", p, v.to(acc))
    return out.to(q.dtype)


def mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    preconditions.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens)
    b, s, h, c = q_latent.shape
    nb, p = kv_cache.shape[:2]
    t = block_table.shape[1] * p  # every position a block-table row can address
    acc = _acc(q_latent, q_pe, kv_cache)
    # Token j of sequence i sits at cache[block_table[i, j // P], j % P]. Unused entries may hold any value:
    # they are clamped into the pool to gather, and masked out below (seq_lens never read on the host).
    blocks = block_table.long().clamp(0, nb - 1)
    j = torch.arange(t, device=q_latent.device)
    lens = seq_lens.long()
    held = (j.view(1, t) < lens.view(b, 1)).unsqueeze(-1)  # [B, T, 1]
    ckv = torch.where(held, kv_cache[blocks].flatten(1, 2).to(acc), 0)  # [B, T, C]
    cpe = torch.where(held, pe_cache[blocks].flatten(1, 2).to(acc), 0)  # [B, T, R]
    scores = (torch.einsum("bshc,btc->bsht", q_latent.to(acc), ckv)
              + torch.einsum("bshr,btr->bsht", q_pe.to(acc), cpe)) * scale
    qi = torch.arange(s, device=q_latent.device).view(1, s, 1, 1)
    visible = j.view(1, 1, 1, t) <= lens.view(b, 1, 1, 1) - s + qi  # causal among the S new queries
    out = torch.einsum("bsht,btc->bshc", scores.masked_fill(~visible, float("-inf")).softmax(-1), ckv)
    # A length outside [S, max_blocks * P] breaks the precondition; checking it on the host would sync the
    # device, so such a sequence's output is NaN instead (conformance fails it).
    bad = (lens < s) | (lens > t)
    return out.masked_fill(bad.view(b, 1, 1, 1), float("nan")).to(q_latent.dtype)


def moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob=True):
    m, e = x.shape[0], weight.shape[0]
    preconditions.moe_gate(e, n_groups, topk_groups, topk)
    acc = _acc(x, weight)
    scores = torch.sigmoid(F.linear(x.to(acc), weight.to(acc)))  # [M, E]
    biased = scores + bias.to(acc)
    if n_groups > 1:
        grouped = biased.view(m, n_groups, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # top-2 sum
        keep = group_scores.topk(topk_groups, dim=-1).indices
        mask = torch.ones(m, n_groups, dtype=torch.bool, device=x.device).scatter_(1, keep, False)
        biased = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    ids = biased.topk(topk, dim=-1).indices
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    w = w * route_scale
    return w.to(torch.float64 if acc == torch.float64 else torch.float32), ids


_GATHER_MAX_PAIRS = 64  # decode-sized batches: gather each (token, expert) pair's weights instead of looping


def _pair_linear(x, w, ids):
    """Row p of x times expert ids[p]'s weight: the `linear` contract per (token, expert) pair, batched."""
    if isinstance(w, Fp8Weight):
        p, k = x.shape
        n, kb = w.weight.shape[1], k // 128
        codes, s = act_quant(x, w.fmt, 128, w.scale_fmt)
        partial = torch.einsum("pbk,pnbk->pnb", codes.float().view(p, kb, 128), w.weight[ids].float().view(p, n, kb, 128))
        b_scale = w.scale_inv[ids].float().repeat_interleave(128, dim=1)[:, :n]  # [P, N, KB]
        return (partial * s.unsqueeze(1) * b_scale).sum(-1).to(x.dtype)
    return torch.einsum("pk,pnk->pn", x, w[ids].to(x.dtype))


def moe_experts(x, topk_weights, topk_ids, w1, w2, w3):
    preconditions.moe_experts(x, topk_weights, topk_ids, w1, w2, w3)
    m, d = x.shape
    acc = _acc(x)
    k = topk_ids.shape[1]
    if topk_ids.numel() <= _GATHER_MAX_PAIRS and not torch.is_grad_enabled():
        valid = topk_ids.flatten() >= 0
        ids = topk_ids.flatten().clamp(min=0)
        xs = x.repeat_interleave(k, dim=0)  # [M*k, D], pair p = (token p // k, slot p % k)
        h = silu_mul(torch.cat((_pair_linear(xs, w1, ids), _pair_linear(xs, w3, ids)), dim=-1))
        out = _pair_linear(h, w2, ids).to(acc) * (topk_weights.flatten().to(acc) * valid).unsqueeze(-1)
        return out.view(m, k, d).sum(1).to(x.dtype)
    y = torch.zeros(m, d, dtype=acc, device=x.device)
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids.clamp(min=-1) + 1, minlength=w1.shape[0] + 1).tolist()[1:]
    start = int((flat_ids < 0).sum())
    for e, cnt in enumerate(counts):
        if cnt == 0:
            continue
        sel = order[start:start + cnt]
        start += cnt
        tok = sel // k
        xe = x[tok]
        h = silu_mul(torch.cat((linear(xe, w1[e]), linear(xe, w3[e])), dim=-1))
        wk = topk_weights.flatten()[sel].to(acc).unsqueeze(-1)
        y = y.index_add(0, tok, linear(h, w2[e]).to(acc) * wk)
    return y.to(x.dtype)


def silu_mul(x):
    if x.shape[-1] % 2:
        raise ContractError(f"silu_mul: last dim {x.shape[-1]} must be even ([gate ; up])")
    acc = _acc(x)
    g, u = x.to(acc).chunk(2, dim=-1)
    return (F.silu(g) * u).to(x.dtype)


def sample(logits, temperature, top_p, generator):
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if not 0.0 < top_p <= 1.0:
        raise ContractError(f"sample: top_p={top_p} must be in (0, 1]; use 1.0 to keep every token")
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    # Exponential race argmax(p / Exp(1)): the noise comes from `generator` on its own device, so a CPU
    # generator draws the same tokens on every backend; a device generator avoids the host copy.
    noise_device = generator.device if generator is not None else probs.device
    noise = torch.empty(probs.shape, dtype=torch.float32, device=noise_device)
    noise.exponential_(generator=generator)
    return (probs / noise.to(probs.device)).argmax(dim=-1)


def _dist_ready(group):
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(x, group=None):
    if is_fp8(x):
        raise ContractError(f"all_reduce: sums of {x.dtype} are not defined; upcast to bf16/fp32 before reducing")
    if _dist_ready(group):
        import torch.distributed as dist

        dist.all_reduce(x, group=group)
    return x


def all_to_all(x, output_split_sizes, input_split_sizes, group=None):
    if sum(input_split_sizes) != x.shape[0]:
        raise ContractError(f"all_to_all: input_split_sizes {list(input_split_sizes)} sum to "
                            f"{sum(input_split_sizes)}, but x has {x.shape[0]} rows")
    if not _dist_ready(group):
        return x
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if len(input_split_sizes) != world or len(output_split_sizes) != world:
        raise ContractError(f"all_to_all: split sizes need one entry per rank ({world}); got "
                            f"{len(input_split_sizes)} in, {len(output_split_sizes)} out")
    send = x.contiguous()
    wire = send.view(torch.uint8) if is_fp8(send) else send  # fp8 travels as bytes: no collective needs fp8 support
    out = torch.empty((sum(output_split_sizes), *send.shape[1:]), dtype=wire.dtype, device=x.device)
    dist.all_to_all_single(out, wire, list(output_split_sizes), list(input_split_sizes), group=group)
    return out.view(x.dtype) if is_fp8(send) else out
