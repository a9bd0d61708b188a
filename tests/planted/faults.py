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
}


def ops_with_fault(fault: str) -> dict:
    """Every cpu_ref op natively, with `fault`'s op replaced by its broken version."""
    from deepport.backends.cpu_ref import BACKEND

    op, broken = FAULTS[fault]
    table = dict(BACKEND.load())
    table[op] = broken
    return table


def backend(fault: str) -> Backend:
    return Backend(name=f"planted_{fault}", device_type="cpu", probe=lambda: Probe(True, "planted fault"),
                   load=lambda: ops_with_fault(fault), dtypes=frozenset({"fp8", "bf16", "fp32"}),
                   fp8_format="e4m3fn", evidence=lambda: "planted fault",
                   description=f"cpu_ref with one planted fault in {FAULTS[fault][0]}")


@hookimpl
def deepport_backends():
    return [backend(f) for f in FAULTS]
