"""Expected values: cpu_ref on the CPU, in fp64 where the op allows, on the case's own (already quantised) inputs."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from deepport.backends.cpu_ref import ops as ref
from deepport.conformance.tolerances import TIE_EPS
from deepport.core.formats import Fp8Weight, is_fp8

_OUT_DTYPE_OPS = ("weight_dequant", "fp8_gemm")  # contracts with an out_dtype parameter
_SAMPLED = ("nucleus", "distribution", "seeded")  # sampling cases: judged by property, never by a reference draw


@dataclass
class Expected:
    """cpu_ref's answer. value: tensor or tuple (reference precision); dtypes/shapes: what a backend must return.

    extra: what a comparison needs beyond the value (quant: the exact quotient x/s; routing: near-tie rows;
    sampling: the nucleus mask or the nucleus distribution).
    """

    value: Any
    dtypes: tuple
    shapes: tuple
    extra: dict = field(default_factory=dict)


def _upcast(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point() and not is_fp8(v):
        return v.to(torch.float64)
    return v


def reference_inputs(case, inputs: dict) -> dict:
    """The arguments cpu_ref gets: fp64 upcasts (fp8 codes and Fp8Weight kept) unless the case needs native dtypes."""
    fp64 = case.reference == "fp64" and case.compare not in ("exact",)
    args = {k: (_upcast(v) if fp64 else v) for k, v in inputs.items()}
    if fp64 and case.op in _OUT_DTYPE_OPS:
        args["out_dtype"] = torch.float64
    return args


def _contract_dtypes(op: str, inputs: dict) -> tuple:
    if op == "act_quant":
        return (inputs["fmt"].dtype, torch.float32)
    if op == "moe_gate":
        return (torch.float32, torch.int64)
    if op == "sample":
        return (torch.int64,)
    if op in _OUT_DTYPE_OPS:
        return (inputs.get("out_dtype", torch.bfloat16),)
    if op == "rms_norm" and inputs.get("residual") is not None:
        return (inputs["x"].dtype, inputs["x"].dtype)
    first = {"mla_decode": "q_latent", "mla_prefill": "q"}.get(op, "x")
    return (inputs[first].dtype,)


def expected(case, inputs: dict) -> Expected:
    """cpu_ref's output for `case` on `inputs` (a CPU dict from case.make()); inputs are not modified."""
    args = reference_inputs(case, inputs)
    if case.compare in _SAMPLED:  # judged by property: no reference draw (it would consume the generator)
        value = torch.empty(args["logits"].shape[0], dtype=torch.int64)
        if case.compare == "seeded":  # three draws: the case's generator, the same seed again, another seed
            value = (value, value, value)
    elif case.expect is not None:  # e.g. collectives across ranks: every rank's seeded inputs, summed or exchanged
        value = case.expect(inputs)
    else:
        with torch.no_grad():
            value = getattr(ref, case.op)(**args)
    outs = value if isinstance(value, tuple) else (value,)
    extra = {}
    if case.compare == "quant":
        x, s = args["x"].double(), outs[1].double()
        k = x.shape[-1]
        extra["quotient"] = (x.unflatten(-1, (k // args["block"], args["block"])) / s.unsqueeze(-1)).flatten(-2)
    elif case.compare == "routing":
        extra["tie_rows"] = _tie_rows(args)
    elif case.compare in _SAMPLED:
        probs = _nucleus_probs(args["logits"].double(), args["temperature"], args["top_p"])
        extra["nucleus"] = probs > 0
        extra["probs"] = probs
    shapes = tuple(tuple(o.shape) for o in outs)
    dtypes = _contract_dtypes(case.op, inputs) * (3 if case.compare == "seeded" else 1)
    return Expected(value, dtypes, shapes, extra)


def _tie_rows(args) -> torch.Tensor:
    """Rows whose selection is a near-tie: k-th vs (k+1)-th masked biased score, or the kept-group boundary."""
    x, w, bias = args["x"].double(), args["weight"].double(), args["bias"].double()
    n_groups, topk_groups, topk = args["n_groups"], args["topk_groups"], args["topk"]
    m = x.shape[0]
    biased = torch.sigmoid(x @ w.T) + bias
    grouped = biased.view(m, n_groups, -1)
    tie = torch.zeros(m, dtype=torch.bool)
    if n_groups > 1:
        gs = grouped.topk(min(2, grouped.shape[-1]), -1).values.sum(-1).sort(-1, descending=True).values
        if topk_groups < n_groups:
            tie |= (gs[:, topk_groups - 1] - gs[:, topk_groups]) < TIE_EPS
        keep = grouped.topk(min(2, grouped.shape[-1]), -1).values.sum(-1).topk(topk_groups, -1).indices
        mask = torch.ones(m, n_groups, dtype=torch.bool).scatter_(1, keep, False)
        biased = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    top = biased.sort(-1, descending=True).values
    if topk < top.shape[1]:
        tie |= (top[:, topk - 1] - top[:, topk]) < TIE_EPS
    return tie


def _nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution `sample` draws from, in fp64; the boundary token counts in when within 1e-6 of top_p."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p + 1e-6, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def on_codes(case, inputs: dict, want: Expected, quantise) -> Expected:
    """fp8 `linear`: the reference GEMM on the activation codes `quantise(x, fmt, block, scale_fmt)` returns (the
    backend's own act_quant), when act_quant's contract accepts them (it allows one-ulp flips at fp32 ties, e.g.
    multiplying by 1/s instead of dividing); otherwise `want` (the reference codes) unchanged. So the flips
    act_quant is allowed never fail linear, and linear is judged as tightly as before everywhere else."""
    from deepport.conformance.compare import compare
    from deepport.conformance.tolerances import tolerance

    x, w = inputs["x"], inputs["w"]
    if case.op != "linear" or not isinstance(w, Fp8Weight):
        return want
    k = x.shape[-1]
    args = {"x": x.reshape(-1, k), "fmt": w.fmt, "block": 128, "scale_fmt": w.scale_fmt}
    qcase = replace(case, op="act_quant", compare="quant", reduction=128, out_dtype="")
    try:
        codes, s = quantise(**args)
        codes, s = codes.detach().cpu(), s.detach().cpu()
        ok = compare(qcase, (codes, s), expected(qcase, args), tolerance(qcase)).ok
    except Exception:  # a broken act_quant is its own cases' failure; linear keeps the reference codes
        return want
    if not ok:
        return want
    y = ref.fp8_gemm(codes, s.float(), w.weight, w.scale_inv, torch.float64)
    return Expected(y.reshape(*x.shape[:-1], -1), want.dtypes, want.shapes, dict(want.extra, codes="backend act_quant"))
