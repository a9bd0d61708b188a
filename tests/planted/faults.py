"""Deliberately broken backends: cpu_ref's ops with exactly one realistic fault each (the suite must fail them).

Shipped to the plugin manager by tests/planted/__init__.py as a throwaway distribution whose
`deepport` entry point names this module; every backend here is `planted_<fault>`.
"""
import torch
import torch.nn.functional as F

from deepport.backends.cpu_ref import ops as ref
from deepport.core.plugins import hookimpl
from deepport.core.registry import Backend, Probe


def gate_biased_weights(x, weight, bias, n_groups, topk_groups, topk, route_scale):
    """Router weights taken from the biased scores (the bias must steer selection only)."""
    _, ids = ref.moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale)
    biased = torch.sigmoid(F.linear(x.float(), weight.float())) + bias.float()
    w = biased.gather(1, ids)
    return w / w.sum(-1, keepdim=True) * route_scale, ids


def gate_group_max(x, weight, bias, n_groups, topk_groups, topk, route_scale):
    """Group score = the group's max biased score instead of the sum of its top-2."""
    m = x.shape[0]
    scores = torch.sigmoid(F.linear(x.float(), weight.float()))
    grouped = (scores + bias.float()).view(m, n_groups, -1)
    keep = grouped.amax(-1).topk(topk_groups, dim=-1).indices
    mask = torch.ones(m, n_groups, dtype=torch.bool).scatter_(1, keep, False)
    ids = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1).topk(topk, dim=-1).indices
    w = scores.gather(1, ids)
    return w / w.sum(-1, keepdim=True) * route_scale, ids


def rope_rotate_half(x, cos, sin):
    """GPT-NeoX rotate-half rope applied to DeepSeek's interleaved-pair weights."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c = torch.cat((cos, cos), -1).float().unsqueeze(-2)
    s = torch.cat((sin, sin), -1).float().unsqueeze(-2)
    return (x.float() * c + torch.cat((-x2, x1), -1) * s).to(x.dtype)


def act_quant_scale_ulp(x, fmt, block=128):
    """Scales from an fp8 max one fp8 ulp below fmt.act_max (e.g. 416 for 448; 224 vs 240 on fnuz)."""
    below = (torch.tensor(fmt.act_max).to(fmt.dtype).view(torch.uint8) - 1).view(fmt.dtype).float().item()
    k = x.shape[-1]
    xb = x.float().unflatten(-1, (k // block, block))
    s = torch.clamp(xb.abs().amax(-1), min=1e-4) / below
    return (xb / s.unsqueeze(-1)).to(fmt.dtype).flatten(-2), s


def _transposed(scale):
    """The [rows, cols] block-scale buffer read as if it were stored column-major."""
    return scale.t().contiguous().view(scale.shape)


def weight_dequant_scales_transposed(w, scale_inv, block=128, out_dtype=torch.bfloat16):
    return ref.weight_dequant(w, _transposed(scale_inv), block, out_dtype)


def fp8_gemm_scales_transposed(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    return ref.fp8_gemm(a, a_scale, b, _transposed(b_scale), out_dtype)


def mla_prefill_no_mscale(q, k, v, causal, scale):
    """Ignores `scale` (which carries YaRN's mscale^2) and uses 1/sqrt(Dk)."""
    return ref.mla_prefill(q, k, v, causal, q.shape[-1] ** -0.5)


def mla_decode_no_mscale(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    """Ignores `scale` and uses 1/sqrt(C + R), the absorbed head width (576 at 671B)."""
    d = q_latent.shape[-1] + q_pe.shape[-1]
    return ref.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, d ** -0.5)


def _gather(cache, row, length):
    """Token j of a sequence sits at cache[row[j // P], j % P]: its first `length` cache rows, in order."""
    page = cache.shape[1]
    return cache[row.long()[: -(-length // page)]].flatten(0, 1)[:length]


def mla_decode_mask_off_by_one(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    """Causal mask among the S new queries shifted by one: query i also sees new token i+1."""
    b, s, h, c = q_latent.shape
    out = torch.empty(b, s, h, c, dtype=torch.float32)
    for i, length in enumerate(seq_lens.tolist()):
        ckv = _gather(kv_cache, block_table[i], length).float()
        cpe = _gather(pe_cache, block_table[i], length).float()
        scores = (torch.einsum("shc,tc->sht", q_latent[i].float(), ckv)
                  + torch.einsum("shr,tr->sht", q_pe[i].float(), cpe)) * scale
        qi = torch.arange(s).view(s, 1, 1)
        j = torch.arange(length).view(1, 1, length)
        scores = scores.masked_fill(j > length - s + qi + 1, float("-inf"))
        out[i] = torch.einsum("sht,tc->shc", scores.softmax(-1), ckv)
    return out.to(q_latent.dtype)


def rms_norm_missing_residual(x, weight, eps, residual=None):
    """Fused add-norm that forgets the add: normalises x alone and passes x on as the residual."""
    if residual is None:
        return ref.rms_norm(x, weight, eps)
    return ref.rms_norm(x, weight, eps), x


# ---- faults the issue-15 cases exist for (each passes every case that predates them) ----------------------

def _scores_prefill(q, k, causal, scale):
    s, t = q.shape[1], k.shape[1]
    scores = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) * scale
    if causal:
        i, j = torch.arange(s).unsqueeze(1), torch.arange(t).unsqueeze(0)
        scores = scores.masked_fill(j > (t - s) + i, float("-inf"))
    return scores


def mla_prefill_no_max_subtraction(q, k, v, causal, scale):
    """softmax as exp(s) / sum exp(s): fine for small scores, inf/inf or 0/0 once |s| passes ~88."""
    e = _scores_prefill(q, k, causal, scale).exp()
    return torch.einsum("bhst,bthd->bshd", e / e.sum(-1, keepdim=True), v.float()).to(q.dtype)


def mla_prefill_running_max_from_zero(q, k, v, causal, scale):
    """Online softmax whose running max starts at 0 instead of -inf (its final value is max(0, row max)): rows
    whose scores are all below about -88 underflow to 0/0."""
    scores = _scores_prefill(q, k, causal, scale)
    e = (scores - scores.amax(-1, keepdim=True).clamp(min=0)).exp()
    return torch.einsum("bhst,bthd->bshd", e / e.sum(-1, keepdim=True), v.float()).to(q.dtype)


def mla_prefill_via_bf16(q, k, v, causal, scale):
    """A bf16-only kernel: fp32 inputs are cast to bf16 and the result cast back (exact for bf16 calls)."""
    b16 = torch.bfloat16
    return ref.mla_prefill(q.to(b16), k.to(b16), v.to(b16), causal, scale).to(q.dtype)


def _decode_rows(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    """Per sequence: (masked scaled scores [S, H, T], latent rows [T, C])."""
    s = q_latent.shape[1]
    for i, length in enumerate(seq_lens.tolist()):
        ckv = _gather(kv_cache, block_table[i], length).float()
        cpe = _gather(pe_cache, block_table[i], length).float()
        scores = (torch.einsum("shc,tc->sht", q_latent[i].float(), ckv)
                  + torch.einsum("shr,tr->sht", q_pe[i].float(), cpe)) * scale
        qi, j = torch.arange(s).view(s, 1, 1), torch.arange(length).view(1, 1, length)
        yield i, scores.masked_fill(j > length - s + qi, float("-inf")), ckv


SPLIT = 256  # tokens per KV split of the split-merge fault


def mla_decode_split_merge_unscaled(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    """Split-KV decode (256 tokens a split) whose merge adds the splits' partial sums without rescaling them to a
    common max: exact while a sequence fits one split."""
    out = torch.empty(q_latent.shape, dtype=torch.float32)
    for i, scores, ckv in _decode_rows(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
        num = den = 0
        for a in range(0, scores.shape[-1], SPLIT):
            part = scores[..., a:a + SPLIT]
            m = part.amax(-1, keepdim=True)
            e = (part - torch.where(torch.isfinite(m), m, torch.zeros_like(m))).exp()
            num = num + torch.einsum("sht,tc->shc", e, ckv[a:a + SPLIT])
            den = den + e.sum(-1, keepdim=True)
        out[i] = num / den
    return out.to(q_latent.dtype)


def mla_decode_mtp_mask_only(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    """A decode kernel written for S <= 2 (one token, or MTP's two): with more new queries it masks none of them
    (every query sees the whole sequence), which only a chunk of 3+ tokens onto a cache exposes."""
    s = q_latent.shape[1]
    if s <= 2:
        return ref.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale)
    out = torch.empty(q_latent.shape, dtype=torch.float32)
    for i, length in enumerate(seq_lens.tolist()):
        ckv = _gather(kv_cache, block_table[i], length).float()
        cpe = _gather(pe_cache, block_table[i], length).float()
        scores = (torch.einsum("shc,tc->sht", q_latent[i].float(), ckv)
                  + torch.einsum("shr,tr->sht", q_pe[i].float(), cpe)) * scale
        out[i] = torch.einsum("sht,tc->shc", scores.softmax(-1), ckv)
    return out.to(q_latent.dtype)


def mla_decode_via_bf16(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    """A bf16-only kernel: fp32 inputs are cast to bf16 and the result cast back (exact for bf16 calls)."""
    b16 = torch.bfloat16
    return ref.mla_decode(q_latent.to(b16), q_pe.to(b16), kv_cache.to(b16), pe_cache.to(b16), block_table, seq_lens,
                          scale).to(q_latent.dtype)


def rms_norm_eps_outside_sqrt(x, weight, eps, residual=None):
    """x / (sqrt(mean(x^2)) + eps): the same as rsqrt(mean + eps) unless mean(x^2) is near eps."""
    r = None if residual is None else (x.float() + residual.float()).to(x.dtype)
    xf = (x if r is None else r).float()
    y = (xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, r)


def rms_norm_fp16_squares(x, weight, eps, residual=None):
    """Squares taken in fp16 (a half-precision reduction): they overflow to inf once |x| > 256."""
    r = None if residual is None else (x.float() + residual.float()).to(x.dtype)
    xf = (x if r is None else r).float()
    ms = xf.half().pow(2).float().mean(-1, keepdim=True)
    y = (xf * torch.rsqrt(ms + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, r)


def fp8_gemm_fp32_via_bf16(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """out_dtype=float32 honoured by upcasting a bf16 result: the right dtype, bf16's precision."""
    return ref.fp8_gemm(a, a_scale, b, b_scale, torch.bfloat16).to(out_dtype)


def weight_dequant_fp32_via_bf16(w, scale_inv, block=128, out_dtype=torch.bfloat16):
    return ref.weight_dequant(w, scale_inv, block, torch.bfloat16).to(out_dtype)


def _nucleus(logits, temperature, top_p, inclusive):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        mass = sorted_p.cumsum(-1) if inclusive else sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return probs / probs.sum(-1, keepdim=True)


def sample_nucleus_one_short(logits, temperature, top_p, generator):
    """Cuts the nucleus on the inclusive cumulative sum: the token that crosses top_p is dropped."""
    if temperature <= 0:
        return ref.sample(logits, temperature, top_p, generator)
    return torch.multinomial(_nucleus(logits, temperature, top_p, True), 1, generator=generator).view(-1)


def sample_temperature_only_with_top_p(logits, temperature, top_p, generator):
    """A top_p = 1 fast path that forgets the temperature."""
    if temperature > 0 and top_p >= 1.0:
        return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator).view(-1)
    return ref.sample(logits, temperature, top_p, generator)


def sample_global_rng(logits, temperature, top_p, generator):
    """Draws from torch's global RNG, not the generator it is given."""
    return ref.sample(logits, temperature, top_p, None)


def sample_fixed_seed(logits, temperature, top_p, generator):
    """Draws from a generator of its own with a fixed seed."""
    return ref.sample(logits, temperature, top_p, torch.Generator().manual_seed(1234))


def all_reduce_mean(x, group=None):
    """Averages instead of summing (identity at world size 1)."""
    import torch.distributed as dist

    ref.all_reduce(x, group)
    if dist.is_initialized():
        x /= dist.get_world_size(group)
    return x


def all_to_all_sources_reversed(x, output_split_sizes, input_split_sizes, group=None):
    """Lays the received chunks out in reverse source-rank order (identity at world size 1)."""
    out = ref.all_to_all(x, output_split_sizes, input_split_sizes, group)
    return torch.cat(list(reversed(out.split(list(output_split_sizes)))))


# fault name -> (op it breaks, faulty implementation)
FAULTS = {
    "gatebias": ("moe_gate", gate_biased_weights),
    "groupmax": ("moe_gate", gate_group_max),
    "rotatehalf": ("rope", rope_rotate_half),
    "scaleulp": ("act_quant", act_quant_scale_ulp),
    "dequantscalet": ("weight_dequant", weight_dequant_scales_transposed),
    "gemmscalet": ("fp8_gemm", fp8_gemm_scales_transposed),
    "prefillmscale": ("mla_prefill", mla_prefill_no_mscale),
    "decodemscale": ("mla_decode", mla_decode_no_mscale),
    "decodemask": ("mla_decode", mla_decode_mask_off_by_one),
    "noresidual": ("rms_norm", rms_norm_missing_residual),
    # issue 15: each is caught only by the cases added for it (tests/test_conformance_teeth.py)
    "prefillnomax": ("mla_prefill", mla_prefill_no_max_subtraction),
    "prefillmax0": ("mla_prefill", mla_prefill_running_max_from_zero),
    "prefillbf16": ("mla_prefill", mla_prefill_via_bf16),
    "decodemerge": ("mla_decode", mla_decode_split_merge_unscaled),
    "decodebf16": ("mla_decode", mla_decode_via_bf16),
    "decodechunk": ("mla_decode", mla_decode_mtp_mask_only),
    "normepsout": ("rms_norm", rms_norm_eps_outside_sqrt),
    "normfp16sq": ("rms_norm", rms_norm_fp16_squares),
    "gemmfp32bf16": ("fp8_gemm", fp8_gemm_fp32_via_bf16),
    "dequantfp32bf16": ("weight_dequant", weight_dequant_fp32_via_bf16),
    "nucleusshort": ("sample", sample_nucleus_one_short),
    "tempignored": ("sample", sample_temperature_only_with_top_p),
    "globalrng": ("sample", sample_global_rng),
    "fixedseed": ("sample", sample_fixed_seed),
    "reducemean": ("all_reduce", all_reduce_mean),
    "a2areversed": ("all_to_all", all_to_all_sources_reversed),
}


MULTI_RANK = {"reducemean", "a2areversed"}  # the identity at world size 1: only a torchrun launch can fail them


def act_quant_reciprocal(x, fmt, block=128, scale_fmt="fp32"):
    """Multiplies by 1/s instead of dividing by s: codes one ulp apart at fp32 rounding ties, which the
    act_quant contract allows. A *correct* variant: it must pass every case, fp8 linear included."""
    from deepport.core.formats import AMAX_FLOOR, round_scale_up_pow2

    k = x.shape[-1]
    xb = x.float().unflatten(-1, (k // block, block))
    s = torch.clamp(xb.abs().amax(-1), min=AMAX_FLOOR) / fmt.act_max
    if scale_fmt == "ue8m0":
        s = round_scale_up_pow2(s)
    return (xb * (1.0 / s).unsqueeze(-1)).to(fmt.dtype).flatten(-2), s


# correct variant name -> (op, implementation): the suite must pass these (planted_ok_<name>)
CORRECT = {"reciprocal": ("act_quant", act_quant_reciprocal)}


def ops_with_fault(fault: str) -> dict:
    """Every cpu_ref op natively, with `fault`'s op replaced by its broken (or, for ok_<name>, correct) version."""
    from deepport.backends.cpu_ref import BACKEND

    op, broken = CORRECT[fault[3:]] if fault.startswith("ok_") else FAULTS[fault]
    table = dict(BACKEND.load())
    table[op] = broken
    return table


def backend(fault: str) -> Backend:
    op = CORRECT[fault[3:]][0] if fault.startswith("ok_") else FAULTS[fault][0]
    what = "a correct variant of" if fault.startswith("ok_") else "one planted fault in"
    return Backend(name=f"planted_{fault}", device_type="cpu", probe=lambda: Probe(True, "planted fault"),
                   load=lambda: ops_with_fault(fault), dtypes=frozenset({"fp8", "bf16", "fp32"}),
                   fp8_format="e4m3fn", evidence=lambda: "planted fault",
                   description=f"cpu_ref with {what} {op}")


@hookimpl
def deepport_backends():
    return [backend(f) for f in FAULTS] + [backend(f"ok_{c}") for c in CORRECT]
