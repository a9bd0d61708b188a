"""cpu: every op contract written for speed on x86 and ARM CPUs with torch's own kernels and, for decode-sized
work, C kernels built at first use (backends/cpu/native: MoE layer, gate tail, MLA decode, RMSNorm, linears that
read fp8 codes or bf16 values; each rule below says when).

Few torch calls per op (a 12M-parameter model's decode is bound by the number of calls, a 671B's by weight
streaming): SDPA for prefill, one batched gather + two bmm for paged decode (no per-sequence loop, no host
synchronisation), RMSNorm through the fused layer_norm kernel, routing and the expert loop on the host for
one or two tokens, sorted groups on K-major copies for more; under torch.compile gathered (token, expert)
pairs, or the eager strategies as one opaque op where experts are large and repeat. Math in fp32 as the
contracts say; bf16 values are upcast (torch's bf16 GEMM where the CPU has native bf16). Each choice is measured in docs/performance.md.
"""
from __future__ import annotations

import os
import struct
import weakref

import torch
import torch.nn.functional as F

from deepport.backends.cpu import gemm_layout, native
from deepport.backends.cpu_ref.ops import weight_dequant  # one torch dequantisation: the spec's is already fast
from deepport.backends.torch_common import all_reduce, all_to_all, sample
from deepport.core import preconditions
from deepport.core.checkpoint import CODES_MIN_WEIGHTS, bf16_of, fp8_codes_of
from deepport.core.errors import ContractError
from deepport.core.formats import AMAX_FLOOR, Fp8Weight, check_scale_fmt, round_scale_up_pow2

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
        if _native_rms(x, weight, residual):
            return native.rms_norm(x, weight, eps, residual)
        r = x if residual is None else x + residual
        y = _rms_by_layer_norm(r, weight, eps) if not torch.compiler.is_compiling() else \
            F.rms_norm(r, (d,), weight if weight.dtype == F32 else weight.float(), eps)  # Inductor fuses it whole
        return y if residual is None else (y, r)
    r = x if residual is None else (x.float() + residual.float()).to(x.dtype)  # r rounded once, after the fp32 add
    y = F.rms_norm(r.float(), (d,), weight.float(), eps).to(x.dtype)
    return y if residual is None else (y, r)


def _native_rms(x, weight, residual) -> bool:
    """The C norm (one call instead of an add and four torch calls; embedded-model decode steps +3.8% at batch 8,
    +6.8% at batch 1, docs/performance.md "Ninth session") for up to native.MAX_TOKENS rows of fp32 CPU tensors that
    need no grad, outside tracing; more rows (prefill) stay with torch's kernel."""
    return (x.numel() <= native.MAX_TOKENS * x.shape[-1] and weight.dtype == F32 and x.is_cpu
            and (residual is None or residual.dtype == F32) and not torch.compiler.is_compiling()
            and not (x.requires_grad or weight.requires_grad or (residual is not None and residual.requires_grad))
            and native.available())


def _derived(w, tag: str, make):
    """make(w), kept on w itself (freed with it) and remade after an in-place change of w; never kept for a
    weight that needs grad or while torch.compile traces (then made per call)."""
    if w.requires_grad or torch.compiler.is_compiling():
        return make(w)
    v = _version(w)
    hit = w.__dict__.get(tag)
    if hit is not None and hit[0] == v:
        return hit[1]
    out = make(w)
    setattr(w, tag, (v, out))
    return out


def _doubled(w):
    wf = w if w.dtype == F32 else w.float()
    return torch.cat((wf, wf))


def _unbound(w):
    """w's per-expert views, taken from a detached alias: views of w itself would keep w alive from its own
    __dict__ (a reference cycle through C++ that the garbage collector cannot see)."""
    return w.detach().unbind(0)


def _rms_by_layer_norm(r, weight, eps):
    """RMSNorm of fp32 r through torch's fused layer_norm kernel: [r ; -r] has mean 0 (up to rounding of the
    sum, ~1e-7 relative, which enters squared) and variance mean(r^2), so layer_norm([r ; -r]) * [w ; w] holds
    rms_norm(r) * w in its first half. One fused kernel and a cat instead of F.rms_norm's CPU composite of ~10
    ops (5 vs 8 us alone; docs/performance.md has the step). The result is a view (row stride 2D)."""
    d = r.shape[-1]
    w2 = _derived(weight, "_deepport_doubled", _doubled)
    return F.layer_norm(torch.cat((r, -r), dim=-1), (2 * d,), w2, None, eps)[..., :d]


_ROT = [None, None, None]  # (cos, sin, complex rotation): every layer's two rope calls share one pair


def _rotation(cos, sin):
    """cos + i sin as [B, S, 1, R/2] complex64, made once per (cos, sin) pair (a forward passes the same pair
    to all 2 x n_layers calls); the pair is held so its ids stay unique while cached."""
    c, sn, rot = _ROT
    if c is cos and sn is sin and not torch.compiler.is_compiling():
        return rot
    rot = torch.complex(cos.float(), sin.float()).unsqueeze(-2)
    if not torch.compiler.is_compiling() and not cos.requires_grad:
        _ROT[:] = cos, sin, rot
    return rot


def _rope_reals(xf, cos, sin):
    """rope's complex product written in reals (the path torch.compile traces): fp32 xf [B, S, H, R]."""
    pairs = xf.reshape(*xf.shape[:-1], xf.shape[-1] // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, sn = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)  # [B, S, 1, R/2]: every head
    return torch.stack((a * c - b * sn, a * sn + b * c), dim=-1).flatten(-2)


def rope(x, cos, sin):
    r = x.shape[-1]
    if r % 2 or cos.shape[-1] != r // 2 or sin.shape != cos.shape:
        raise ContractError(f"rope: x rope dim {r} must be even and cos/sin last dim {r // 2}; "
                            f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    xf = x if x.dtype == F32 else x.float()
    if torch.compiler.is_compiling():  # Inductor generates no code for complex ops: the same product in reals
        out = _rope_reals(xf, cos, sin)
        return out if x.dtype == F32 else out.to(x.dtype)
    # interleaved pairs are complex numbers: one complex product per pair (5 calls in eager)
    xc = torch.view_as_complex(xf.reshape(*x.shape[:-1], r // 2, 2))
    out = torch.view_as_real(xc * _rotation(cos, sin)).flatten(-2)
    return out if x.dtype == F32 else out.to(x.dtype)


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


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    m, k = a.shape
    n = b.shape[0]
    preconditions.fp8_gemm(a, a_scale, b, b_scale)
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


# Where a GEMM reads a weight K-major ([K, N] contiguous, MKL's no-transpose layout) rather than as torch's [N, K]:
# prefill-sized GEMMs (M > 16) always (1.5-3x faster, docs/performance.md); decode-sized ones (M <= 16) where
# gemm_layout measured it faster on this machine for that shape and row count (it depends on the CPU: see there;
# dense weights may also go through oneDNN as stored). The first GEMM that wants the K-major copy makes it, kept
# while the weight lives and rebuilt if it is modified in place: RAM for the copies, capped at _LAYOUT_BUDGET
# bytes (DEEPPORT_CPU_LAYOUT_BYTES; beyond it GEMMs use [N, K]).
_LAYOUT: dict = {}  # id(w) -> (weakref to w, w's version, K-major copy[, its per-expert views]);
#                     ("gate_up", id(w1)) -> (weakref to w1, versions, [w1 ; w3] K-major copy, views, weakref to w3)
_LAYOUT_BUDGET = int(os.environ.get("DEEPPORT_CPU_LAYOUT_BYTES", 2 << 30))
_layout_bytes = [0]


def _version(w) -> int:
    try:
        return w._version
    except RuntimeError:  # inference tensors carry no version counter (and cannot be changed outside it)
        return -1


def _kmajor(w):
    """w with its last two dims transposed, contiguous ([.., K, N]), made once and kept while w lives; rebuilt
    after an in-place change of w. None when it may not be cached (grad, compiling, over the budget)."""
    if w.requires_grad or torch.compiler.is_compiling():
        return None
    key = id(w)
    hit = _LAYOUT.get(key)
    v = _version(w)
    if hit is not None and hit[0]() is w and hit[1] == v:
        return hit[2]
    if hit is not None:
        _drop(key)
    nbytes = w.numel() * w.element_size()
    if _layout_bytes[0] + nbytes > _LAYOUT_BUDGET:
        return None
    out = w.transpose(-1, -2).contiguous()
    _LAYOUT[key] = (weakref.ref(w, lambda _, k=key: _drop(k)), v, out)
    _layout_bytes[0] += nbytes
    return out


def _drop(key) -> None:
    hit = _LAYOUT.pop(key, None)
    if hit is not None:
        _layout_bytes[0] -= hit[2].numel() * hit[2].element_size()


def _gemm(x, w):
    """x [..., K] @ w[N, K]^T, reading w the way gemm_layout found fastest here for this row count and shape: as
    stored (F.linear), from its K-major copy, or as stored through oneDNN."""
    if torch.compiler.is_compiling():
        return F.linear(x, w)
    way = gemm_layout.layout(x.numel() // x.shape[-1], w.shape[1], w.shape[0], w.dtype)
    if way == "kmajor":
        wt = _kmajor(w)
        if wt is not None:
            return torch.mm(x, wt) if x.dim() == 2 else torch.matmul(x, wt)
    elif way == "onednn" and not (w.requires_grad and torch.is_grad_enabled()) and w.is_contiguous():
        return gemm_layout.onednn_linear(x.contiguous(), w)
    return F.linear(x, w)


def linear(x, w):
    if isinstance(w, Fp8Weight):
        return _fp8_linear(x, w)
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    if w.numel() >= CODES_MIN_WEIGHTS and x.numel() <= _NATIVE_MAX_TOKENS * x.shape[-1] \
            and x.shape[-1] == w.shape[-1] and not torch.compiler.is_compiling():
        # load kept codes or bf16 values (a K mismatch goes on to torch's shape error; a traced step reads neither)
        codes = fp8_codes_of(w)
        if codes is not None and _native_linear(x):
            return native.linear_e4m3(x, codes)
        w16 = bf16_of(w) if x.numel() <= _BF16_MAX_ROWS * x.shape[-1] else None
        if w16 is not None and _native_linear(x):
            return native.linear_bf16(x, w16)
    return _gemm(x, w)


# rows up to which a kept bf16 weight is read in C: half the bytes of the fp32 copy (v3-200m's lm_head, batch 1:
# +3.6% a step on one thread, +1.6% on two); past it MKL's GEMM on the fp32 copy wins (v3-200m at batch 8: 0.97x
# a step with the C path up to 16 rows; docs/performance.md "Ninth session")
_BF16_MAX_ROWS = 2


def _native_linear(x) -> bool:
    """An FP8 checkpoint's large weight read as its codes in C (a bf16 weight as its bf16 values): fp32 CPU x that
    needs no grad, outside tracing, on one thread or in a parallel build (MKL splits large GEMVs across threads; a
    serial build does not)."""
    return (x.dtype == F32 and x.device.type == "cpu" and not x.requires_grad and not torch.compiler.is_compiling()
            and native.available() and native.threads_ok())


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
    p = kv_cache.shape[1]
    if not torch.compiler.is_compiling():
        # eager: the lengths are host values on a CPU (no device to wait for), so read only the blocks in use
        lens = seq_lens.tolist()
        preconditions.mla_decode_lengths(lens, s, block_table.shape[1] * p)
        if _native_attention(q_latent, q_pe, kv_cache, pe_cache):  # reads the queries in place (no reshape copies)
            return native.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale)
    ql = q_latent.reshape(b, s * h, c)
    qp = q_pe.reshape(b, s * h, -1)
    if ql.dtype != F32 or qp.dtype != F32:
        ql, qp = ql.float(), qp.float()
    if torch.compiler.is_compiling():  # static shapes: the whole block-table row, masked
        return _decode_masked(ql, qp, kv_cache, pe_cache, block_table, seq_lens, scale, s).to(q_latent.dtype)
    top = max(lens)
    nblk = -(-top // p)
    if min(lens) != top:
        return _decode_masked(ql, qp, kv_cache, pe_cache, block_table[:, :nblk], seq_lens, scale, s).to(q_latent.dtype)
    # every row holds `top` tokens: exactly those, no padding to mask
    blocks = block_table[:, :nblk]  # int32 indexes as well as int64 (no conversion per layer)
    ckv = _gather_blocks(kv_cache, blocks).view(b, nblk * p, c)[:, :top]
    cpe = _gather_blocks(pe_cache, blocks).view(b, nblk * p, -1)[:, :top]
    if ckv.dtype != F32:
        ckv, cpe = ckv.float(), cpe.float()
    scores = torch.baddbmm(torch.bmm(qp, cpe.transpose(1, 2)), ql, ckv.transpose(1, 2), alpha=scale, beta=scale)
    if s > 1:  # causal among the S new queries: query i sees keys j <= top - S + i, so the last S - 1 - i are
        per_query = scores.view(b, s, h, top)  # masked in place (S - 1 fills; a mask tensor cost 17 vs 4 us)
        for i in range(s - 1):
            per_query[:, i, :, top - s + i + 1:].fill_(float("-inf"))
    out = torch.bmm(scores.softmax(-1), ckv).view(b, s, h, c)
    return out if out.dtype == q_latent.dtype else out.to(q_latent.dtype)


def _native_attention(ql, qp, kv_cache, pe_cache) -> bool:
    """The C decode kernel (one call a layer instead of ~20) for fp32 CPU tensors (both query parts: the kernel
    reads their bytes as fp32) that need no grad, on one thread or in a parallel build (a serial build would leave
    torch's other threads idle)."""
    if not (ql.dtype == qp.dtype == kv_cache.dtype == pe_cache.dtype == F32) or ql.device.type != "cpu":
        return False
    if ql.requires_grad or qp.requires_grad or not (kv_cache.is_contiguous() and pe_cache.is_contiguous()):
        return False
    return native.available() and native.threads_ok()


def _gather_blocks(pool, blocks):
    """pool [NB, P, X] rows at blocks [B, N]: [B*N, P, X]. index_select copies whole rows (3x faster here than
    advanced indexing, which goes element by element: 6.7 vs 19.5 us at 8 x 3 blocks of the embedded model)."""
    return pool.index_select(0, blocks.flatten())


def _decode_masked(ql, qp, kv_cache, pe_cache, block_table, seq_lens, scale, s):
    """Every row's block-table row in one gather; entries past a row's length are masked (ids clamped so any
    value is safe to index, rows zeroed so NaN/inf there cannot leak through 0 * x). fp32 [B, S, H, C]."""
    b, sh, c = ql.shape
    h = sh // s
    nb, p = kv_cache.shape[:2]
    t = block_table.shape[1] * p
    blocks = block_table.long().clamp(0, nb - 1)
    j = torch.arange(t, device=ql.device)
    valid = j.unsqueeze(0) < seq_lens.unsqueeze(1).long()  # [B, T]
    ckv = _gather_blocks(kv_cache, blocks).view(b, t, c)
    cpe = _gather_blocks(pe_cache, blocks).view(b, t, -1)
    if ckv.dtype != F32:
        ckv, cpe = ckv.float(), cpe.float()
    ckv = ckv.masked_fill(~valid.unsqueeze(-1), 0.0)
    cpe = cpe.masked_fill(~valid.unsqueeze(-1), 0.0)
    scores = torch.baddbmm(torch.bmm(qp, cpe.transpose(1, 2)), ql, ckv.transpose(1, 2), alpha=scale, beta=scale)
    # query i of S sits at position L - S + i: causal among the new tokens, nothing past L
    qpos = seq_lens.long().unsqueeze(1) - s + torch.arange(s, device=ql.device).unsqueeze(0)  # [B, S]
    allowed = j.view(1, 1, t) <= qpos.unsqueeze(-1)  # [B, S, T]
    scores = scores.view(b, s, h, t).masked_fill(~allowed.unsqueeze(2), float("-inf"))
    out = torch.bmm(scores.softmax(-1).view(b, s * h, t), ckv)
    return out.view(b, s, h, c)


def _f32(v: float) -> float:
    """v rounded to the nearest fp32 value (what an fp32 add of two fp32 values gives: their double sum is exact)."""
    return _F32_STRUCT.unpack(_F32_STRUCT.pack(v))[0]


_F32_STRUCT = struct.Struct("f")
_HOST_ROUTE_MAX = 2  # M <= this: routing on the host (batch-1 decode, MTP verification)


def _route_on_host(biased, n_groups, topk_groups, topk):
    """The expert ids [M, k] of up to _HOST_ROUTE_MAX tokens chosen on the host (batch-1 decode: ~15 small torch
    calls cost more than sorting E floats in Python; +4% per decode step, measured). Same selection as the
    torch path: fp32 group sums, ties to the lower index."""
    out = []
    for b in biased.tolist():
        e = len(b)
        allowed = range(e)
        if n_groups > 1:
            g = e // n_groups
            sums = []
            for i in range(n_groups):
                top = sorted(b[i * g:(i + 1) * g], reverse=True)[:2]
                sums.append(_f32(top[0] + top[1]) if len(top) == 2 else top[0])
            keep = sorted(range(n_groups), key=lambda i: (-sums[i], i))[:topk_groups]
            allowed = [j for i in sorted(keep) for j in range(i * g, (i + 1) * g)]
        out.append(sorted(allowed, key=lambda j: (-b[j], j))[:topk])
    return torch.tensor(out, dtype=torch.long, device=biased.device)


def _ranks(v):
    """rank[..., i] = how many entries of v's last dim come before v[..., i] (larger, or equal at a lower index):
    pairwise comparisons that Inductor fuses into one reduction (torch.topk is a fallback call it cannot fuse)."""
    n = v.shape[-1]
    idx = torch.arange(n, device=v.device)
    a, b = v.unsqueeze(-1), v.unsqueeze(-2)  # [.., i, 1], [.., 1, j]
    before = (b > a) | ((b == a) & (idx.view(1, n) < idx.view(n, 1)))  # j before i
    return before.sum(-1)


def _route_by_ranks(biased, n_groups, topk_groups, topk):
    """The expert ids [M, k] the torch path picks (largest first, ties to the lower index), from ranks."""
    m, e = biased.shape
    if n_groups > 1:
        grouped = biased.view(m, n_groups, -1)
        top2 = min(2, grouped.shape[-1])
        group_scores = grouped.masked_fill(_ranks(grouped) >= top2, 0.0).sum(-1)  # top-2 sum per group
        drop = _ranks(group_scores) >= topk_groups
        biased = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).view(m, e)
    pick = _ranks(biased).unsqueeze(-1) == torch.arange(topk, device=biased.device)  # [M, E, k]: rank r at e
    return (pick * torch.arange(e, device=biased.device).view(1, e, 1)).sum(1)


def _native_route(scores, n_groups) -> bool:
    """The C gate tail (bias add, selection and weights: one call instead of ~14 torch calls, or the host sort) for
    up to _NATIVE_MAX_TOKENS fp32 CPU tokens outside tracing."""
    m, e = scores.shape
    return (m <= _NATIVE_MAX_TOKENS and scores.dtype == F32 and scores.is_cpu and not scores.requires_grad
            and not torch.compiler.is_compiling() and e <= native.ROUTE_MAX_EXPERTS and native.available())


def moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob=True):
    m, e = x.shape[0], weight.shape[0]
    preconditions.moe_gate(e, n_groups, topk_groups, topk)
    xf = x if x.dtype == F32 else x.float()
    scores = torch.sigmoid(F.linear(xf, weight if weight.dtype == F32 else weight.float()))  # [M, E]
    bias = bias if bias.dtype == F32 else bias.float()
    if _native_route(scores, n_groups):  # the bias add, the selection and the weights in one C call
        return native.moe_gate_tail(scores, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob)
    biased = scores + bias
    if m <= _HOST_ROUTE_MAX and not torch.compiler.is_compiling():
        ids = _route_on_host(biased, n_groups, topk_groups, topk)
        w = scores.gather(1, ids)
        return (w * (route_scale / w.sum(-1, keepdim=True)) if norm_topk_prob else w * route_scale), ids
    if torch.compiler.is_compiling():  # fused comparisons instead of 3 topk fallbacks a layer (see _ranks)
        ids = _route_by_ranks(biased, n_groups, topk_groups, topk)
    else:
        if n_groups > 1:
            grouped = biased.view(m, n_groups, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # top-2 sum per group
            keep = group_scores.topk(topk_groups, dim=-1).indices
            drop = torch.ones(m, n_groups, dtype=torch.bool, device=x.device).scatter_(1, keep, False)
            biased = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).view(m, e)
        ids = biased.topk(topk, dim=-1).indices
    w = scores.gather(1, ids)
    return (w * (route_scale / w.sum(-1, keepdim=True)) if norm_topk_prob else w * route_scale), ids


# MoE strategy (measured in whole decode steps, docs/performance.md): decode is bound by reading weights and,
# for small models, by the number of torch calls.
#   fp32 and the C kernel built (backends/cpu/native): one call for the whole layer, reading an FP8 checkpoint's
#     expert codes where load kept them (a quarter of the bytes), up to _NATIVE_MAX_TOKENS tokens, see _use_native;
#   up to _PER_TOKEN_MAX tokens (batch-1 decode, MTP's 2-token verification): a host loop over each token's k
#     experts on per-expert views of the stacked weights, 3 GEMVs each (reads only those experts; the ids are
#     host values on a CPU, so reading them costs no sync; MTP 1.06x with 2 against 1.01x with 1 and 1.04x with 4);
#   more tokens: sorted by expert, one GEMM per touched expert on K-major copies of the expert weights (each
#     expert read once; 2.5x faster in a batch-8 step than all experts in three dense GEMMs, which was tried);
#   while torch.compile traces: gathered per-pair weights (sync-free; Inductor fuses the gather), except
#   past _PAIR_MAX pairs, or once experts repeat and one expert's weights reach _HOST_EXPERT_BYTES: the eager
#     strategies as one opaque custom op (deepport_cpu::moe_experts_host), see _traced_strategy.
_PAIR_MAX = 64
_HOST_EXPERT_BYTES = 1 << 20
_PER_TOKEN_MAX = 2  # M <= this: the per-token expert loop (batch-1 decode, MTP verification: measured, see docs)
_NATIVE_EXPERT_BYTES = 1 << 20
_NATIVE_MAX_TOKENS = native.MAX_TOKENS  # past it the torch strategies win (measured, see native/__init__.py)


def _use_native(x, w1, w2, w3, fp8: bool) -> bool:
    """The C kernel runs fp32 CPU tensors that need no grad, outside tracing, where it was measured faster than
    the torch strategies (docs/performance.md): up to _NATIVE_MAX_TOKENS tokens, and then for experts under
    _NATIVE_EXPERT_BYTES (cache-resident: calls cost more than reading), or on one thread or in a parallel build
    (MKL splits larger GEMMs across threads; a serial build does not) reading fp8 codes (fp8: a quarter of the
    bytes) or for up to _PER_TOKEN_MAX tokens."""
    if isinstance(w1, Fp8Weight) or not (x.dtype == w1.dtype == w2.dtype == w3.dtype == F32):
        return False
    if x.shape[0] > _NATIVE_MAX_TOKENS or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if x.requires_grad or w1.requires_grad or w2.requires_grad or w3.requires_grad or not native.available():
        return False
    if not (w1.is_contiguous() and w2.is_contiguous() and w3.is_contiguous()):
        return False
    if 3 * w1.shape[1] * w1.shape[2] * 4 < _NATIVE_EXPERT_BYTES:
        return True
    return native.threads_ok() and (fp8 or x.shape[0] <= _PER_TOKEN_MAX)


def _swiglu(gate, up):
    """silu(gate) * up as silu_mul computes it (fp32 math, rounded once to the inputs' dtype)."""
    if gate.dtype == F32:
        return F.silu(gate).mul_(up)
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _experts_per_token(x, topk_weights, topk_ids, w1, w2, w3):
    """A few tokens (decode, MTP verification): per token y = sum_j w_j * w2[e_j](silu(w1[e_j] x) * w3[e_j] x),
    one expert at a time, fp32 accumulation in each token's top-k order; ids and weights read on the host (free
    on a CPU). An expert that both of two tokens chose runs once, as a 2-row GEMM (consecutive tokens of MTP's
    verification share 1.5 of their 4 experts on average on the embedded model: fewer calls, one read)."""
    ids_rows, wts_rows = topk_ids.tolist(), topk_weights.tolist()
    i_ = w1.shape[1]

    def ffn(xe, views, e):
        v13, v1, v3, v2 = views
        if v13 is not None:
            gu = torch.mm(xe, v13[e])
            h = _swiglu(gu[:, :i_], gu[:, i_:])
        else:
            h = _swiglu(torch.mm(xe, v1[e]), torch.mm(xe, v3[e]))
        o = torch.mm(h, v2[e])
        return o if o.dtype == F32 else o.float()

    both = {}  # expert -> its [2, D] output, for experts both tokens chose
    if len(ids_rows) == 2:
        views2 = None
        for e in ids_rows[0]:
            if e >= 0 and e in ids_rows[1]:
                views2 = views2 or _moe_views(w1, w3, w2, 2)
                both[e] = ffn(x, views2, e)
    views = _moe_views(w1, w3, w2, 1)
    rows = []
    for i, (ids, wts) in enumerate(zip(ids_rows, wts_rows)):
        xi = x if x.shape[0] == 1 else x[i:i + 1]
        y = None
        for e, wt in zip(ids, wts):
            if e < 0:
                continue
            o = both[e][i:i + 1] if e in both else ffn(xi, views, e)
            y = o.mul_(wt) if y is None else y.add_(o, alpha=wt)
        rows.append(y if y is not None else torch.zeros(xi.shape, dtype=F32, device=x.device))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


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
    """Tokens sorted by expert, one GEMM per touched expert (reads the counts on the host). Dense weights: each
    expert's down projection lands in its rows of one [P, D] buffer (mm out=), weighted and added to the tokens
    once at the end (2 calls an expert fewer than weighting and adding per expert)."""
    m, d = x.shape
    k = topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat.clamp(min=-1) + 1, minlength=w1.shape[0] + 1).tolist()
    first = counts[0]  # ids < 0 sort first and contribute nothing
    if first:
        order = order[first:]
    tok = order // k
    ws = topk_weights.flatten().index_select(0, order)
    ws = (ws if ws.dtype == F32 else ws.float()).unsqueeze(-1)
    y = torch.zeros(m, d, dtype=F32, device=x.device)
    xs = x.index_select(0, tok)  # whole rows: faster than x[tok] here (2.0 vs 4.8 us)
    if isinstance(w1, Fp8Weight):
        start = 0
        for e, cnt in enumerate(counts[1:]):
            if cnt:
                sl = slice(start, start + cnt)
                xe = xs[sl]
                o = linear(silu_mul(torch.cat((linear(xe, w1[e]), linear(xe, w3[e])), dim=-1)), w2[e])
                y.index_add_(0, tok[sl], o.float().mul_(ws[sl]))
                start += cnt
        return y
    i_ = w1.shape[1]
    views = {}  # rows bucket -> the per-expert views in the layouts measured for it (see _moe_views)
    out = torch.empty(xs.shape[0], d, dtype=xs.dtype, device=x.device)
    start = 0
    for e, cnt in enumerate(counts[1:]):
        if cnt:
            b = gemm_layout.bucket(cnt)
            if b not in views:
                views[b] = _moe_views(w1, w3, w2, b)
            v13, v1, v3, v2 = views[b]
            xe = xs[start:start + cnt]
            if v13 is not None:
                gu = torch.mm(xe, v13[e])
                h = _swiglu(gu[:, :i_], gu[:, i_:])
            else:
                h = _swiglu(torch.mm(xe, v1[e]), torch.mm(xe, v3[e]))
            torch.mm(h, v2[e], out=out[start:start + cnt])
            start += cnt
    return y.index_add_(0, tok, (out if out.dtype == F32 else out.float()).mul_(ws))


def _moe_views(w1, w3, w2, rows: int):
    """(gate_up, w1, w3, w2) per-expert views for GEMMs of `rows` rows: where gemm_layout measured K-major faster
    for w1's shape, gate_up holds views of one K-major copy of [w1 ; w3] ([D, 2I] an expert: gate and up in one
    GEMM, one stream from memory; decode steps up to 8% faster than two GEMVs, docs/performance.md) and w1, w3 are
    None; else gate_up is None and w1, w3 are transposed views of the weights as stored. w2: [K, N] views in its
    own measured layout."""
    v13 = None
    if gemm_layout.kmajor_faster(rows, w1.shape[2], w1.shape[1], w1.dtype):
        v13 = _gate_up(w1, w3)
    v1, v3 = (None, None) if v13 is not None else (_expert_views(w1, False), _expert_views(w3, False))
    return v13, v1, v3, _expert_views(w2, gemm_layout.kmajor_faster(rows, w2.shape[2], w2.shape[1], w2.dtype))


def _gate_up(w1, w3):
    """Per-expert views of one K-major copy of [w1 ; w3] ([E, D, 2I]), kept in _LAYOUT while w1 lives (and
    counted in its budget); remade after an in-place change of either; None when it may not be made."""
    if w1.requires_grad or w3.requires_grad or torch.compiler.is_compiling():
        return None
    key = ("gate_up", id(w1))
    v = (_version(w1), _version(w3))
    hit = _LAYOUT.get(key)
    if hit is not None and hit[0]() is w1 and hit[1] == v and hit[4]() is w3:
        return hit[3]
    if hit is not None:
        _drop(key)
    e, i, d = w1.shape
    nbytes = 2 * w1.numel() * w1.element_size()
    if _layout_bytes[0] + nbytes > _LAYOUT_BUDGET:
        return None
    out = torch.empty(e, d, 2 * i, dtype=w1.dtype, device=w1.device)
    out[:, :, :i].copy_(w1.transpose(1, 2))
    out[:, :, i:].copy_(w3.transpose(1, 2))
    _LAYOUT[key] = (weakref.ref(w1, lambda _, k=key: _drop(k)), v, out, out.unbind(0), weakref.ref(w3))
    _layout_bytes[0] += nbytes
    return _LAYOUT[key][3]


def _expert_views(w, kmajor: bool):
    """Per-expert [K, N] views of a stacked expert weight w [E, N, K]: views of its K-major copy (if asked for and
    the copy may be made), else transposed views of w itself (the same MKL call F.linear makes). Each kept with
    its own weight (freed with it)."""
    if kmajor and _kmajor(w) is not None:
        hit = _LAYOUT[id(w)]
        if len(hit) == 3:  # (weakref to w, w's version, K-major copy): add the copy's views
            hit = _LAYOUT[id(w)] = (*hit, hit[2].unbind(0))
        return hit[3]
    return _derived(w, "_deepport_experts_t", _transposed_views)


def _transposed_views(w):
    # a weight that needs grad gets views of itself (made per call, see _derived), so gradients reach it
    return tuple(v.t() for v in (w.unbind(0) if w.requires_grad else _unbound(w)))


def _experts_on_host(x, topk_weights, topk_ids, w1, w2, w3):
    """The eager strategies (reading ids and counts on the host), fp32 [M, D]."""
    codes = tuple(fp8_codes_of(w) for w in (w1, w2, w3)) if not isinstance(w1, Fp8Weight) else (None,)
    codes = None if None in codes else codes
    if _use_native(x, w1, w2, w3, codes is not None):
        return native.moe_experts(x, topk_weights, topk_ids, w1, w2, w3, codes)
    if x.shape[0] <= _PER_TOKEN_MAX and not isinstance(w1, Fp8Weight):
        return _experts_per_token(x, topk_weights, topk_ids, w1, w2, w3)
    return _experts_grouped(x, topk_weights, topk_ids, w1, w2, w3)


@torch.library.custom_op("deepport_cpu::moe_experts_host", mutates_args=())
def _moe_experts_host(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w1: torch.Tensor,
                      w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    y = _experts_on_host(x, topk_weights, topk_ids, w1, w2, w3)
    return y if y.dtype == x.dtype else y.to(x.dtype)


@_moe_experts_host.register_fake
def _(x, topk_weights, topk_ids, w1, w2, w3):
    return torch.empty_like(x)


def _traced_strategy(x, topk_ids, w1, w2, w3) -> str:
    """Under torch.compile: "pairs" (traced gathered pairs, fused by Inductor) or "host" (the eager strategies as
    one opaque op that reads the ids on the host: no graph break, each expert read once). Pairs win while the
    weights they gather twice are few or small (embedded model, batch 8: 5.3 vs 7.9 ms a step; v3-200m batch 1:
    46 vs 44 tok/s); the host op wins once experts repeat and are large (v3-200m batch 8: 122 vs 91 tok/s) and
    past _PAIR_MAX pairs. Tensors that need grad stay traced (the host op has no autograd formula)."""
    if x.requires_grad or w1.requires_grad or w2.requires_grad or w3.requires_grad:
        return "pairs"
    pairs, experts = topk_ids.numel(), w1.shape[0]
    expert_bytes = 3 * w1.shape[1] * w1.shape[2] * w1.element_size()  # w1, w3 [I, D] and w2 [D, I] an expert
    if pairs > _PAIR_MAX or (pairs > experts and expert_bytes >= _HOST_EXPERT_BYTES):
        return "host"
    return "pairs"


def moe_experts(x, topk_weights, topk_ids, w1, w2, w3):
    preconditions.moe_experts(x, topk_weights, topk_ids, w1, w2, w3)
    if not isinstance(w1, Fp8Weight) and not (w1.dtype == w2.dtype == w3.dtype == x.dtype):
        raise ContractError(f"moe_experts: expert weights are {w1.dtype}/{w2.dtype}/{w3.dtype} but x is {x.dtype}; "
                            f"the contract takes them in x.dtype (or as Fp8Weight): convert them once at load, "
                            f"not per call")
    if torch.compiler.is_compiling() and not isinstance(w1, Fp8Weight):
        if _traced_strategy(x, topk_ids, w1, w2, w3) == "host":
            return torch.ops.deepport_cpu.moe_experts_host(x, topk_weights, topk_ids, w1, w2, w3)
        y = _experts_pairs(x, topk_weights, topk_ids, w1, w2, w3)
    else:
        y = _experts_on_host(x, topk_weights, topk_ids, w1, w2, w3)
    return y.to(x.dtype)


def silu_mul(x):
    if x.shape[-1] % 2:
        raise ContractError(f"silu_mul: last dim {x.shape[-1]} must be even ([gate ; up])")
    if x.dtype == F32:
        g, u = x.chunk(2, dim=-1)
        return F.silu(g).mul_(u)
    g, u = x.float().chunk(2, dim=-1)
    return (F.silu(g) * u).to(x.dtype)
