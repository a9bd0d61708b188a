"""Cross-check cpu_ref with an implementation nobody here wrote: each op's ONNX function run by onnxruntime
(CPU EP) on the conformance suite's case inputs, judged with the suite's tolerance table and comparisons.

Not cross-checked (status skip, with the reason): sampling at temperature > 0 (ONNX has no way to replay
torch.Generator's exponential draws; the greedy case is checked) and all_to_all with split sizes other
than one rank's. all_reduce / all_to_all are identities in one process, as the contracts say.
"""
from __future__ import annotations

import time

import onnx
import torch
from onnx import helper as oh

from deepport.core.formats import Fp8Weight
from deepport.onnx import functions as F
from deepport.onnx import runtime
from deepport.onnx.runtime import TORCH_TO_ONNX

LABEL = "onnxruntime"


def _call(case, inputs: dict):
    """(function name, {input name: tensor}, attributes) for one contract call, or (None, reason, None)."""
    op, a = case.op, inputs
    if op == "rms_norm":
        if a.get("residual") is None:
            return "rms_norm", {"x": a["x"], "weight": a["weight"]}, {"eps": float(a["eps"])}
        return "rms_norm_residual", {"x": a["x"], "residual": a["residual"], "weight": a["weight"]}, \
            {"eps": float(a["eps"])}
    if op == "rope":
        return "rope", {k: a[k] for k in ("x", "cos", "sin")}, {}
    if op == "act_quant":
        fmt = a["fmt"]
        return "act_quant", {"x": a["x"]}, {"act_max": float(fmt.act_max), "block": int(a.get("block", 128)),
                                             "fp8_type": F.FP8_TYPES[fmt.name],
                                             "ue8m0": int(a.get("scale_fmt", "fp32") == "ue8m0")}
    if op == "weight_dequant":
        return "weight_dequant", {"w": a["w"], "scale_inv": a["scale_inv"]}, \
            {"block": int(a.get("block", 128)), "to": TORCH_TO_ONNX[a.get("out_dtype", torch.bfloat16)]}
    if op == "fp8_gemm":
        return "fp8_gemm", {k: a[k] for k in ("a", "a_scale", "b", "b_scale")}, \
            {"to": TORCH_TO_ONNX[a.get("out_dtype", torch.bfloat16)]}
    if op == "linear":
        w = a["w"]
        if isinstance(w, Fp8Weight):
            return "linear_fp8", {"x": a["x"], "w": w.weight, "scale_inv": w.scale_inv}, _fp8_attrs(w)
        return "linear", {"x": a["x"], "w": w}, {}
    if op == "mla_prefill":
        return "mla_prefill", {k: a[k] for k in ("q", "k", "v")}, \
            {"causal": int(bool(a["causal"])), "scale": float(a["scale"])}
    if op == "mla_decode":
        names = ("q_latent", "q_pe", "kv_cache", "pe_cache", "block_table", "seq_lens")
        return "mla_decode", {k: a[k] for k in names}, {"scale": float(a["scale"])}
    if op == "moe_gate":
        return "moe_gate", {k: a[k] for k in ("x", "weight", "bias")}, \
            {"n_groups": int(a["n_groups"]), "topk_groups": int(a["topk_groups"]), "topk": int(a["topk"]),
             "route_scale": float(a["route_scale"]), "norm_topk_prob": int(bool(a.get("norm_topk_prob", True)))}
    if op == "moe_experts":
        base = {k: a[k] for k in ("x", "topk_weights", "topk_ids")}
        if isinstance(a["w1"], Fp8Weight):
            for n in ("w1", "w2", "w3"):
                base[n], base[n + "_scale_inv"] = a[n].weight, a[n].scale_inv
            return "moe_experts_fp8", base, _fp8_attrs(a["w1"])
        return "moe_experts", {**base, **{n: a[n] for n in ("w1", "w2", "w3")}}, {}
    if op == "silu_mul":
        return "silu_mul", {"x": a["x"]}, {}
    if op == "sample":
        if a["temperature"] > 0:
            return None, ("sampling at temperature > 0 draws from torch.Generator's stream, which ONNX cannot "
                          "replay; the greedy case is cross-checked"), None
        return "sample_greedy", {"logits": a["logits"]}, {}
    if op == "all_reduce":
        return "all_reduce", {"x": a["x"]}, {}
    if op == "all_to_all":
        m = a["x"].shape[0]
        if list(a["output_split_sizes"]) != [m] or list(a["input_split_sizes"]) != [m]:
            return None, "all_to_all across ranks has no single-process ONNX form (identity for one rank only)", None
        return "all_to_all", {"x": a["x"]}, {}
    return None, f"no ONNX function for op {op!r}", None


def _fp8_attrs(w: Fp8Weight) -> dict:
    return {"act_max": float(w.fmt.act_max), "fp8_type": F.FP8_TYPES[w.fmt.name],
            "ue8m0": int(w.scale_fmt == "ue8m0")}


def single_node_model(function: str, feeds: dict, attrs: dict, out_dtypes, out_shapes,
                      overrides: dict | None = None) -> onnx.ModelProto:
    """A model holding one deepport-domain node (plus every function body) with typed, shaped I/O."""
    outs = [f"out{i}" for i in range(len(out_dtypes))]
    node = oh.make_node(function, list(feeds), outs, domain=F.DOMAIN, **attrs)
    inputs = [oh.make_tensor_value_info(k, TORCH_TO_ONNX[v.dtype], list(v.shape)) for k, v in feeds.items()]
    outputs = [oh.make_tensor_value_info(n, TORCH_TO_ONNX[dt], list(shape))
               for n, dt, shape in zip(outs, out_dtypes, out_shapes)]
    graph = oh.make_graph([node], f"{function}_case", inputs, outputs)
    m = oh.make_model(graph, functions=F.functions(overrides),
                      opset_imports=[oh.make_opsetid("", F.OPSET), oh.make_opsetid(F.DOMAIN, F.DOMAIN_VERSION)])
    m.ir_version = max(m.ir_version, 10)
    return m


def run_case(case, overrides: dict | None = None, fp8_format: str = "e4m3fn"):
    """One case through onnxruntime; returns a conformance CaseResult (never raises)."""
    from deepport.conformance.compare import Outcome, compare
    from deepport.conformance.reference import expected
    from deepport.conformance.report import CaseResult
    from deepport.conformance.tolerances import tolerance

    tol = tolerance(case)
    suffix = LABEL if fp8_format == "e4m3fn" or case.dtype != "fp8" else f"{LABEL}:{fp8_format}"
    res = CaseResult(case.op, f"{case.name}@{suffix}", case.dtype, "fail", LABEL, rtol=tol.rtol, atol=tol.atol)
    t0 = time.perf_counter()
    try:
        inputs = case.make(device="cpu", fp8_format=fp8_format)
        want = expected(case, inputs)
        function, feeds, attrs = _call(case, inputs)
    except Exception as e:
        res.reason = f"building the case or its reference failed: {type(e).__name__}: {e}"
        return res
    if function is None:
        res.status, res.impl, res.reason = "skip", "", feeds
        return res
    try:
        model = single_node_model(function, feeds, attrs, want.dtypes, want.shapes, overrides)
        onnx.checker.check_model(model, full_check=True)
        got = tuple(runtime.run(runtime.session(model), feeds))
        outcome = compare(case, got if len(got) > 1 else got[0], want, tol)
    except Exception as e:
        outcome = Outcome(False, detail=f"onnxruntime could not run deepport.{function}: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''}")
    res.seconds = time.perf_counter() - t0
    res.max_abs, res.max_rel = outcome.max_abs, outcome.max_rel
    res.status = "pass" if outcome.ok else "fail"
    res.reason = outcome.detail
    return res


def run(*, tier: str = "quick", dtypes=("fp8", "bf16"), ops=None, progress=None, overrides=None,
        fp8_format: str = "e4m3fn") -> list:
    """Cross-check every case of `tier` (ops, dtypes) in onnxruntime against cpu_ref; list of CaseResult.

    progress: optional callable, called as progress(done, total, text) after each case.
    overrides: {function name: FunctionProto} replacing bodies (tests use it to prove a wrong body fails).
    fp8_format: the encoding fp8 cases are built in (e4m3fnuz: MI300's, activations quantised to 224).
    """
    from deepport.conformance.cases import all_cases

    cases = all_cases(tier, ops, tuple(dtypes))
    results = []
    for i, case in enumerate(cases):
        results.append(run_case(case, overrides, fp8_format))
        if progress:
            progress(i + 1, len(cases), f"{results[-1].case} {results[-1].status}")
    return results


REQUANT_EPS = 2.0 ** -18  # relative: 32 fp32 ulps, far above silu's library-to-library difference (a few)


def requant_slack(args) -> torch.Tensor:
    """moe_experts_fp8's replay allowance [M, D]: what fp8 codes of the re-quantised SwiGLU intermediate
    h = silu(g) * u that sit at a rounding boundary can change in the output if they round the other way.

    The node quantises h inside itself, and silu's last ulp is library-specific (torch's silu and
    onnxruntime's Exp differ on a few percent of inputs), so where h / s is within a few fp32 ulps of the
    midpoint between two codes the two implementations may pick either: exact inputs cannot make that node
    bit-exact. A code counts as at a boundary when moving h / s by REQUANT_EPS (relative) changes it; every
    other code must match, so the allowance is zero almost everywhere. `args` are the recorded call's
    (x, topk_weights, topk_ids, w1, w1_scale_inv, w2, w2_scale_inv, w3, w3_scale_inv, act_max, fp8_type,
    ue8m0)."""
    from deepport.backends.cpu_ref import ops as ref
    from deepport.core.formats import FORMATS, dequantize_weight

    x, tw, ids, w1, s1, w2, s2, w3, s3, _act_max, fp8_type, ue8m0 = args
    fmt = next(f for f in FORMATS.values() if F.FP8_TYPES[f.name] == fp8_type)
    scale_fmt = "ue8m0" if ue8m0 else "fp32"
    k = ids.shape[1]
    valid = (ids >= 0).flatten()
    flat = ids.flatten().clamp(min=0)
    xs = x.repeat_interleave(k, dim=0)
    w = {n: Fp8Weight(c, sc, scale_fmt=scale_fmt) for n, c, sc in (("w1", w1, s1), ("w3", w3, s3))}
    h = ref.silu_mul(torch.cat((ref._pair_linear(xs, w["w1"], flat), ref._pair_linear(xs, w["w3"], flat)), -1))
    codes, s = ref.act_quant(h, fmt, 128, scale_fmt)  # [P, I], [P, I/128]
    scale = s.repeat_interleave(128, dim=1)
    r = h.float() / scale
    c = codes.float()
    jump = torch.maximum((r * (1 + REQUANT_EPS)).to(fmt.dtype).float() - c,
                         c - (r * (1 - REQUANT_EPS)).to(fmt.dtype).float()).abs() * scale  # [P, I], 0 off boundaries
    w2d = dequantize_weight(w2, s2)[flat]  # [P, D, I]
    per_pair = (w2d.abs() * jump.unsqueeze(1)).sum(-1) * (tw.flatten().abs().float() * valid).unsqueeze(-1)
    return per_pair.view(x.shape[0], k, -1).sum(1)  # [M, D]


def replay(model: onnx.ModelProto, records: list, rtol: float = 1e-4, atol: float = 1e-4) -> list[tuple]:
    """Teacher-forced check of an exported graph: each deepport-domain node, run alone in onnxruntime on the
    exact inputs cpu_ref saw when the graph ran eagerly (deepport.onnx.nodes.RECORD, same order), must give
    cpu_ref's outputs (floats within rtol/atol, integers exactly). Returns [(node name, function, ok, detail)].

    moe_experts_fp8 re-quantises an intermediate inside the node: its outputs may differ by requant_slack
    (codes at a rounding boundary rounding the other way) on top of rtol/atol; the detail says how many did."""
    from deepport.conformance.compare import _close
    from deepport.conformance.tolerances import Tol

    graph_nodes = [n for n in model.graph.node if n.domain == F.DOMAIN]
    if len(graph_nodes) != len(records):
        raise ValueError(f"{len(records)} recorded calls for {len(graph_nodes)} deepport nodes; record exactly "
                         f"one eager run of the exported module")
    results = []
    for node, (function, args, outs) in zip(graph_nodes, records):
        if node.op_type != function:
            raise ValueError(f"graph node {node.name} is {node.op_type} but the recorded call is {function}")
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        feeds = {f"in{i}": t for i, t in enumerate(tensors)}
        names = [o for o in (f"out{i}" for i in range(len(outs)))]
        single = oh.make_node(node.op_type, list(feeds), names, domain=F.DOMAIN)
        single.attribute.extend(node.attribute)
        graph = oh.make_graph(
            [single], node.op_type,
            [oh.make_tensor_value_info(k, TORCH_TO_ONNX[v.dtype], list(v.shape)) for k, v in feeds.items()],
            [oh.make_tensor_value_info(n, TORCH_TO_ONNX[o.dtype], list(o.shape)) for n, o in zip(names, outs)])
        m = oh.make_model(graph, functions=F.functions(),
                          opset_imports=[oh.make_opsetid("", F.OPSET), oh.make_opsetid(F.DOMAIN, F.DOMAIN_VERSION)])
        m.ir_version = max(m.ir_version, 10)
        got = runtime.run(runtime.session(m), feeds)
        ok, detail = True, []
        for i, (g, e) in enumerate(zip(got, outs)):
            if e.is_floating_point():
                r = _close(g.float(), e.float(), Tol(rtol, atol), f"output {i}: ")
                if not r.ok and function == "moe_experts_fp8":
                    r = _within_requant_slack(g.float(), e.float(), requant_slack(args), rtol, atol, r)
                ok &= r.ok
                detail += [r.detail] if not r.ok or r.detail else []
            elif not torch.equal(g.sort(-1).values, e.sort(-1).values):  # routing ids: order within a row is free
                ok = False
                detail.append(f"output {i}: integer outputs differ")
        results.append((node.name, function, ok, "; ".join(detail)))
    return results


def _within_requant_slack(g, e, slack, rtol, atol, plain):
    """plain _close's failure re-judged with moe_experts_fp8's allowance (see requant_slack)."""
    from deepport.conformance.compare import Outcome

    diff, tol = (g - e).abs(), atol + rtol * e.abs()
    n, beyond = int((diff > tol).sum()), diff > tol + slack
    if not beyond.any():
        return Outcome(True, plain.max_abs, plain.max_rel,
                       f"{n} of {e.numel()} elements differ by fp8 codes of the re-quantised SwiGLU "
                       f"intermediate at a rounding boundary")
    return Outcome(False, plain.max_abs, plain.max_rel,
                   f"{plain.detail}; {int(beyond.sum())} beyond what boundary codes of the re-quantised "
                   f"SwiGLU intermediate explain")
