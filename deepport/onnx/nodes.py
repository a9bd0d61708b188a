"""The export op table: each contract call runs cpu_ref (so the trace carries real values) and is recorded
as one `deepport.<function>` node by torch.onnx's TorchScript exporter (autograd.Function.symbolic)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from deepport.backends.cpu_ref import ops as ref
from deepport.core.errors import DeepportError
from deepport.core.formats import FORMATS, Fp8Format, Fp8Weight, check_scale_fmt
from deepport.onnx.functions import DOMAIN, FP8_TYPES
from deepport.onnx.runtime import TORCH_TO_ONNX

RECORD: list | None = None  # when a list, every node call appends (function, args, outputs): node-by-node checks


def _node(function: str, impl, attrs: tuple[str, ...], outputs: int = 1):
    """An autograd.Function whose forward is `impl(*tensors, *attrs)` and whose ONNX form is one node."""

    def forward(ctx, *args):
        state = torch._C._get_tracing_state()  # the node is opaque: do not trace cpu_ref's inner ops
        torch._C._set_tracing_state(None)
        try:
            out = impl(*args)
        finally:
            torch._C._set_tracing_state(state)
        if RECORD is not None:
            RECORD.append((function, args, out if isinstance(out, tuple) else (out,)))
        return out

    def symbolic(g, *args):
        tensors, values = args[:len(args) - len(attrs)], args[len(args) - len(attrs):]
        kw = {}
        for name, v in zip(attrs, values):
            kw[f"{name}_{'f' if isinstance(v, float) else 'i'}"] = v if isinstance(v, float) else int(v)
        return g.op(f"{DOMAIN}::{function}", *tensors, outputs=outputs, **kw)

    return type(function, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                        "symbolic": staticmethod(symbolic)})


RmsNorm = _node("rms_norm", lambda x, w, eps: ref.rms_norm(x, w, eps), ("eps",))
RmsNormResidual = _node("rms_norm_residual", lambda x, r, w, eps: ref.rms_norm(x, w, eps, r), ("eps",), 2)
Rope = _node("rope", ref.rope, ())
ActQuant = _node("act_quant", lambda x, act_max, block, fp8_type, ue8m0: ref.act_quant(
    x, _FORMAT_OF[fp8_type], block, _SCALE_FMT[ue8m0]), ("act_max", "block", "fp8_type", "ue8m0"), 2)
WeightDequant = _node("weight_dequant", lambda w, s, block, to: ref.weight_dequant(w, s, block, _TORCH_OF[to]),
                      ("block", "to"))
Fp8Gemm = _node("fp8_gemm", lambda a, sa, b, sb, to: ref.fp8_gemm(a, sa, b, sb, _TORCH_OF[to]), ("to",))
Linear = _node("linear", ref.linear, ())
LinearFp8 = _node("linear_fp8", lambda x, w, s, act_max, fp8_type, ue8m0: ref.linear(
    x, Fp8Weight(w, s, scale_fmt=_SCALE_FMT[ue8m0])), ("act_max", "fp8_type", "ue8m0"))
MlaPrefill = _node("mla_prefill", lambda q, k, v, causal, scale: ref.mla_prefill(q, k, v, bool(causal), scale),
                   ("causal", "scale"))
MlaDecode = _node("mla_decode", ref.mla_decode, ("scale",))
MoeGate = _node("moe_gate", lambda x, w, bias, groups, topk_groups, topk, route_scale, norm: ref.moe_gate(
    x, w, bias, groups, topk_groups, topk, route_scale, bool(norm)),
    ("n_groups", "topk_groups", "topk", "route_scale", "norm_topk_prob"), 2)
MoeExperts = _node("moe_experts", ref.moe_experts, ())
MoeExpertsFp8 = _node(
    "moe_experts_fp8",
    lambda x, tw, ids, w1, s1, w2, s2, w3, s3, act_max, fp8_type, ue8m0: ref.moe_experts(
        x, tw, ids, *(Fp8Weight(w, s, scale_fmt=_SCALE_FMT[ue8m0]) for w, s in ((w1, s1), (w2, s2), (w3, s3)))),
    ("act_max", "fp8_type", "ue8m0"))
SiluMul = _node("silu_mul", ref.silu_mul, ())
SampleGreedy = _node("sample_greedy", lambda logits: ref.sample(logits, 0.0, 1.0, None), ())

_TORCH_OF = {v: k for k, v in TORCH_TO_ONNX.items()}
_FORMAT_OF: dict[int, Fp8Format] = {FP8_TYPES[f.name]: f for f in FORMATS.values()}
_SCALE_FMT = {0: "fp32", 1: "ue8m0"}  # the functions' ue8m0 attribute


def _ue8m0(scale_fmt: str) -> int:
    check_scale_fmt(scale_fmt, "onnx export")
    return int(scale_fmt == "ue8m0")


def _fp8_attrs(w: Fp8Weight) -> tuple[float, int, int]:
    return float(w.fmt.act_max), FP8_TYPES[w.fmt.name], _ue8m0(w.scale_fmt)


def rms_norm(x, weight, eps, residual=None):
    if residual is None:
        return RmsNorm.apply(x, weight, float(eps))
    return RmsNormResidual.apply(x, residual, weight, float(eps))


def linear(x, w):
    if isinstance(w, Fp8Weight):
        return LinearFp8.apply(x, w.weight, w.scale_inv, *_fp8_attrs(w))
    return Linear.apply(x, w)


def act_quant(x, fmt: Fp8Format, block=128, scale_fmt="fp32"):
    return ActQuant.apply(x, float(fmt.act_max), int(block), FP8_TYPES[fmt.name], _ue8m0(scale_fmt))


def moe_experts(x, topk_weights, topk_ids, w1, w2, w3):
    if isinstance(w1, Fp8Weight):
        return MoeExpertsFp8.apply(x, topk_weights, topk_ids, w1.weight, w1.scale_inv, w2.weight, w2.scale_inv,
                                   w3.weight, w3.scale_inv, *_fp8_attrs(w1))
    return MoeExperts.apply(x, topk_weights, topk_ids, w1, w2, w3)


def moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob=True):
    return MoeGate.apply(x, weight, bias, int(n_groups), int(topk_groups), int(topk), float(route_scale),
                         int(bool(norm_topk_prob)))


def sample(logits, temperature, top_p, generator):
    if temperature > 0:
        raise DeepportError("the ONNX export samples greedily only (temperature 0); sample from the exported "
                            "logits outside the graph for temperature > 0")
    return SampleGreedy.apply(logits)


def table(fp8: Fp8Format | None = None) -> SimpleNamespace:
    """The op table a Transformer is built with for export (same names and signatures as the contracts)."""
    return SimpleNamespace(
        backend="onnx-export", device=torch.device("cpu"), fp8=fp8, report={},
        rms_norm=rms_norm, rope=Rope.apply, act_quant=act_quant, linear=linear,
        weight_dequant=lambda w, scale_inv, block=128, out_dtype=torch.bfloat16: WeightDequant.apply(
            w, scale_inv, int(block), TORCH_TO_ONNX[out_dtype]),
        fp8_gemm=lambda a, a_scale, b, b_scale, out_dtype=torch.bfloat16: Fp8Gemm.apply(
            a, a_scale, b, b_scale, TORCH_TO_ONNX[out_dtype]),
        mla_prefill=lambda q, k, v, causal, scale: MlaPrefill.apply(q, k, v, int(causal), float(scale)),
        mla_decode=lambda q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale: MlaDecode.apply(
            q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, float(scale)),
        moe_gate=moe_gate,
        moe_experts=moe_experts, silu_mul=SiluMul.apply,
        sample=sample, all_reduce=ref.all_reduce, all_to_all=ref.all_to_all,
    )
