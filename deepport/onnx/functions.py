"""One ONNX function per op contract, in the `deepport` domain, bodies made of standard ONNX ops only.

A runtime that knows nothing of deepport (onnxruntime) inlines the bodies; a vendor runtime replaces a
`deepport.<op>` node with its own fused kernel. Bodies follow deepport/backends/cpu_ref/ops.py: math in
fp32, results cast back to the input's dtype with CastLike. Contracts whose arguments differ in kind get
one function per variant (`rms_norm_residual`, `linear_fp8`, `moe_experts_fp8`, `sample_greedy`).
Bodies are self-contained (no function calls another): onnxruntime rejects fp8 inputs passed on to a
nested model-local function, and standard Gather has no fp8 types, so moe_experts_fp8 dequantises the
stacked experts before gathering them per (token, expert) pair.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, TensorProto
from onnx import helper as oh

DOMAIN = "deepport"
DOMAIN_VERSION = 1
OPSET = 21  # blocked QuantizeLinear / DequantizeLinear (block_size) need opset 21
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
FP8_TYPES = {"e4m3fn": TensorProto.FLOAT8E4M3FN, "e4m3fnuz": TensorProto.FLOAT8E4M3FNUZ}


class Ref:
    """A node attribute whose value is the enclosing function's attribute `name`."""

    def __init__(self, name: str, kind: int):
        self.name, self.kind = name, kind


class Body:
    """Builds a FunctionProto node by node: `b("Add", x, y)` returns the output name(s)."""

    def __init__(self, name: str, inputs: list[str], outputs: list[str], attributes: tuple[str, ...] = (),
                 doc: str = "", defaults: dict | None = None):
        """defaults: attributes a node may leave out, with their values (ue8m0 0, norm_topk_prob 1)."""
        self.name, self.inputs, self.outputs, self.attributes, self.doc = name, inputs, outputs, attributes, doc
        self.defaults = defaults or {}
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def __call__(self, op: str, *inputs: str, outs: int | list[str] = 1, **attrs):
        names = [self._fresh(op.lower()) for _ in range(outs)] if isinstance(outs, int) else list(outs)
        node = oh.make_node(op, list(inputs), names,
                            **{k: v for k, v in attrs.items() if not isinstance(v, Ref)})
        for key, v in attrs.items():
            if isinstance(v, Ref):
                node.attribute.append(oh.make_attribute_ref(key, v.kind, ref_attr_name=v.name))
        self.nodes.append(node)
        return names[0] if len(names) == 1 else tuple(names)

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self("Constant", value=onnx.numpy_helper.from_array(arr, self._fresh("c")))

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def attr_float(self, name: str) -> str:
        return self("Constant", value_float=Ref(name, AttributeProto.FLOAT))

    def attr_int(self, name: str, shape1: bool = False) -> str:
        v = self("Constant", value_int=Ref(name, AttributeProto.INT))
        return self("Reshape", v, self.ints(1)) if shape1 else v

    def f32(self, x: str) -> str:
        return self("Cast", x, to=FLOAT)

    def dim(self, x: str, axis: int) -> str:
        """Shape(x)[axis] as a 1-D int64 tensor of length 1."""
        return self("Shape", x, start=axis) if axis == -1 else self("Shape", x, start=axis, end=axis + 1)

    def scalar(self, t1: str) -> str:
        return self("Squeeze", t1, self.ints(0))

    def proto(self) -> FunctionProto:
        return oh.make_function(DOMAIN, self.name, self.inputs, self.outputs, self.nodes,
                                [oh.make_opsetid("", OPSET)], attributes=list(self.attributes),
                                attribute_protos=[oh.make_attribute(k, v) for k, v in self.defaults.items()],
                                doc_string=self.doc)


def _rms(b: Body, xf: str, weight: str) -> str:
    ms = b("ReduceMean", b("Mul", xf, xf), b.ints(-1), keepdims=1)
    inv = b("Reciprocal", b("Sqrt", b("Add", ms, b.attr_float("eps"))))
    return b("Mul", b("Mul", xf, inv), b.f32(weight))


def rms_norm() -> FunctionProto:
    b = Body("rms_norm", ["x", "weight"], ["y"], ("eps",), "x / sqrt(mean(x^2) + eps) * weight, fp32 math")
    b("CastLike", _rms(b, b.f32("x"), "weight"), "x", outs=["y"])
    return b.proto()


def rms_norm_residual() -> FunctionProto:
    b = Body("rms_norm_residual", ["x", "residual", "weight"], ["y", "r"], ("eps",),
             "r = x + residual (rounded to x's dtype); y = rms_norm(r)")
    r = b("CastLike", b("Add", b.f32("x"), b.f32("residual")), "x", outs=["r"])
    b("CastLike", _rms(b, b.f32(r), "weight"), "x", outs=["y"])
    return b.proto()


def rope() -> FunctionProto:
    b = Body("rope", ["x", "cos", "sin"], ["out"], (), "interleaved (pairwise) rotary embedding, fp32 math")
    shape = b("Shape", "x")
    pairs = b("Reshape", b.f32("x"), b("Concat", b("Shape", "x", end=-1), b.ints(-1, 2), axis=0))
    x0, x1 = b("Gather", pairs, b.const(0, np.int64), axis=-1), b("Gather", pairs, b.const(1, np.int64), axis=-1)
    c, s = b("Unsqueeze", b.f32("cos"), b.ints(-2)), b("Unsqueeze", b.f32("sin"), b.ints(-2))  # [B, S, 1, R/2]
    o0 = b("Sub", b("Mul", x0, c), b("Mul", x1, s))
    o1 = b("Add", b("Mul", x0, s), b("Mul", x1, c))
    st = b("Concat", b("Unsqueeze", o0, b.ints(-1)), b("Unsqueeze", o1, b.ints(-1)), axis=-1)
    b("CastLike", b("Reshape", st, shape), "x", outs=["out"])
    return b.proto()


UE8M0 = {"ue8m0": 0}  # attribute default: fp32 activation scales unless the node says ue8m0=1


def _pow2_up(b: Body, s: str) -> str:
    """2^ceil(log2 s) exactly, for positive normal fp32 s: Pow(2, Ceil(Log(s) / ln 2)) is a power of two at
    most one step off (Log rounds), so one halving and one doubling test settle it."""
    c = b("Pow", b.const(2.0), b("Ceil", b("Div", b("Log", s), b.const(np.log(2.0)))))
    half = b("Mul", c, b.const(0.5))
    c = b("Where", b("GreaterOrEqual", half, s), half, c)
    return b("Where", b("Less", c, s), b("Mul", c, b.const(2.0)), c)


def _act_quant(b: Body, x: str, block: int | None = None, outs=(None, None)):
    """codes, s = fp8(x / s) with s = max(amax, 1e-4) / act_max per row and `block` channels (QuantizeLinear);
    with the function's attribute ue8m0=1, s is rounded up to a power of two first (DeepSeek-V3.1).
    block None: the function's `block` attribute."""
    xf = b.f32(x)
    lead = b("Shape", x, end=-1)
    size = b.attr_int("block", shape1=True) if block is None else b.ints(block)
    blocked = b("Reshape", xf, b("Concat", lead, b.ints(-1), size, axis=0))
    amax = b("ReduceMax", b("Abs", blocked), b.ints(-1), keepdims=0)
    s = b("Div", b("Max", amax, b.const(1e-4)), b.attr_float("act_max"))
    ue8m0 = b("Cast", b.attr_int("ue8m0"), to=BOOL)
    s = b("Where", ue8m0, _pow2_up(b, s), s, outs=[outs[1]] if outs[1] else 1)
    zero = b("Cast", b("Mul", s, b.const(0.0)), to=Ref("fp8_type", AttributeProto.INT))  # picks the fp8 type
    codes = b("QuantizeLinear", xf, s, zero, axis=-1, outs=[outs[0]] if outs[0] else 1,
              block_size=Ref("block", AttributeProto.INT) if block is None else block)
    return codes, s


def act_quant() -> FunctionProto:
    b = Body("act_quant", ["x"], ["codes", "s"], ("act_max", "block", "fp8_type", "ue8m0"),
             "per-token, per-block fp8 quantisation: s = max(amax, 1e-4) / act_max (ue8m0=1: rounded up to "
             "2^ceil(log2 s)); codes = fp8(x / s) (blocked QuantizeLinear, 1 x block)", UE8M0)
    _act_quant(b, "x", outs=("codes", "s"))
    return b.proto()


def _expand_rows(b: Body, scale: str, n_rows: str, block: str) -> str:
    """Repeat each row of a block-scale grid [.., GN, GK] `block` times and cut to n_rows: [.., N, GK]."""
    tiled = b("Expand", b("Unsqueeze", scale, b.ints(-2)),
              b("Concat", b("Shape", scale, end=-1), block, b("Shape", scale, start=-1), axis=0))  # [.., GN, blk, GK]
    flat = b("Reshape", tiled, b("Concat", b("Shape", scale, end=-2), b.ints(-1), b("Shape", scale, start=-1), axis=0))
    return b("Slice", flat, b.ints(0), n_rows, b.ints(-2))


def _dequant(b: Body, codes: str, scale: str, axis: int, block: int | None = None) -> str:
    """fp32 W = codes * scale in block x block tiles: rows expanded, then blocked DequantizeLinear along K.
    block None: the function's `block` attribute."""
    size = Ref("block", AttributeProto.INT) if block is None else block
    rows = _expand_rows(b, scale, b("Shape", codes, start=-2, end=-1),
                        b.attr_int("block", shape1=True) if block is None else b.ints(block))
    return b("DequantizeLinear", codes, rows, axis=axis, block_size=size)


def weight_dequant() -> FunctionProto:
    b = Body("weight_dequant", ["w", "scale_inv"], ["out"], ("block", "to"),
             "W[n, k] = w[n, k] * scale_inv[n // block, k // block], rounded once to `to`")
    b("Cast", _dequant(b, "w", "scale_inv", 1), to=Ref("to", AttributeProto.INT),
      outs=["out"])
    return b.proto()


def _block_dots(b: Body, a_codes: str, w_codes: str, equation: str, a_shape, w_shape) -> str:
    """Per-128-block dot products of fp8 codes cast to fp32 (exact products, as cpu_ref's fp8_gemm)."""
    a = b("Reshape", b.f32(a_codes), b.ints(*a_shape))
    w = b("Reshape", b.f32(w_codes), b.ints(*w_shape))
    return b("Einsum", a, w, equation=equation)


def _scaled_sum(b: Body, partial: str, a_scale: str, w_scale_rows: str) -> str:
    """sum over K blocks of partial * a_scale * b_scale, multiplied in that order (cpu_ref's fp8_gemm)."""
    return b("ReduceSum", b("Mul", b("Mul", partial, a_scale), w_scale_rows), b.ints(-1), keepdims=0)


def _gemm_fp8(b: Body, a_codes: str, a_scale: str, w: str, w_scale: str) -> str:
    """fp32 C [M, N] = A [M, K] (1x128 scales [M, K/128]) @ W [N, K]^T (128x128 scales), cpu_ref's order."""
    partial = _block_dots(b, a_codes, w, "mbk,nbk->mnb", (0, -1, 128), (0, -1, 128))  # [M, N, KB]
    rows = _expand_rows(b, w_scale, b("Shape", w, start=0, end=1), b.ints(128))  # [N, KB]
    return _scaled_sum(b, partial, b("Unsqueeze", a_scale, b.ints(1)), b("Unsqueeze", rows, b.ints(0)))


def fp8_gemm() -> FunctionProto:
    b = Body("fp8_gemm", ["a", "a_scale", "b", "b_scale"], ["c"], ("to",),
             "C = dequant(A, 1x128) @ dequant(B, 128x128)^T: exact per-block code products, times both scales, "
             "summed over K blocks in fp32, rounded once to `to`")
    b("Cast", _gemm_fp8(b, "a", b.f32("a_scale"), "b", b.f32("b_scale")), to=Ref("to", AttributeProto.INT),
      outs=["c"])
    return b.proto()


def linear() -> FunctionProto:
    b = Body("linear", ["x", "w"], ["y"], (), "y = x @ W^T with fp32 accumulation, in x's dtype")
    y = b("MatMul", b.f32("x"), b("Transpose", b.f32("w"), perm=[1, 0]))
    b("CastLike", y, "x", outs=["y"])
    return b.proto()


def linear_fp8() -> FunctionProto:
    b = Body("linear_fp8", ["x", "w", "scale_inv"], ["y"], ("act_max", "fp8_type", "ue8m0"),
             "W8A8: act_quant(x) (ue8m0=1: power-of-two scales) then fp8_gemm with the 128x128 block-scaled "
             "weight, out in x's dtype", UE8M0)
    rows = b("Reshape", "x", b("Concat", b.ints(-1), b.dim("x", -1), axis=0))
    codes, s = _act_quant(b, rows, 128)
    y = _gemm_fp8(b, codes, s, "w", b.f32("scale_inv"))
    y = b("Reshape", y, b("Concat", b("Shape", "x", end=-1), b.dim("w", 0), axis=0))
    b("CastLike", y, "x", outs=["y"])
    return b.proto()


def mla_prefill() -> FunctionProto:
    b = Body("mla_prefill", ["q", "k", "v"], ["out"], ("causal", "scale"),
             "softmax(scale * q k^T + bottom-right causal mask) v over T, fp32")
    q = b("Transpose", b.f32("q"), perm=[0, 2, 1, 3])  # [B, H, S, Dk]
    k = b("Transpose", b.f32("k"), perm=[0, 2, 3, 1])  # [B, H, Dk, T]
    v = b("Transpose", b.f32("v"), perm=[0, 2, 1, 3])  # [B, H, T, Dv]
    scores = b("Mul", b("MatMul", q, k), b.attr_float("scale"))
    s, t = b.scalar(b.dim("q", 1)), b.scalar(b.dim("k", 1))
    one = b.const(1, np.int64)
    i = b("Range", b.const(0, np.int64), s, one)
    j = b("Range", b.const(0, np.int64), t, one)
    limit = b("Add", b("Unsqueeze", i, b.ints(1)), b("Sub", t, s))  # [S, 1]
    mask = b("And", b("Greater", b("Unsqueeze", j, b.ints(0)), limit), b("Cast", b.attr_int("causal"), to=BOOL))
    p = b("Softmax", b("Where", mask, b.const(-np.inf), scores), axis=-1)
    out = b("Transpose", b("MatMul", p, v), perm=[0, 2, 1, 3])
    b("CastLike", out, "q", outs=["out"])
    return b.proto()


def mla_decode() -> FunctionProto:
    b = Body("mla_decode", ["q_latent", "q_pe", "kv_cache", "pe_cache", "block_table", "seq_lens"], ["out"],
             ("scale",), "absorbed MLA over the paged latent cache; V is the latent itself")
    one, zero = b.const(1, np.int64), b.const(0, np.int64)
    lens = b("Cast", "seq_lens", to=INT64)  # [B]
    page = b.scalar(b.dim("kv_cache", 1))
    n_pages = b.scalar(b.dim("block_table", 1))
    # Unused block-table entries may hold anything: replace them by block 0 before gathering, mask after.
    page_start = b("Mul", b("Range", zero, n_pages, one), page)
    used = b("Less", b("Unsqueeze", page_start, b.ints(0)), b("Unsqueeze", lens, b.ints(1)))  # [B, max_blocks]
    table = b("Where", used, b("Cast", "block_table", to=INT64), zero)
    batch = b.dim("q_latent", 0)
    tokens = b("Range", zero, b("Mul", n_pages, page), one)  # [T]
    valid = b("Unsqueeze", b("Less", b("Unsqueeze", tokens, b.ints(0)), b("Unsqueeze", lens, b.ints(1))), b.ints(-1))

    def gather(cache):  # [NB, P, X] -> [B, T, X], zero past each sequence's length
        g = b("Gather", b.f32(cache), table, axis=0)
        g = b("Reshape", g, b("Concat", batch, b.ints(-1), b.dim(cache, 2), axis=0))
        return b("Where", valid, g, b.const(0.0))

    ckv, cpe = gather("kv_cache"), gather("pe_cache")
    scores = b("Add", b("Einsum", b.f32("q_latent"), ckv, equation="bshc,btc->bsht"),
               b("Einsum", b.f32("q_pe"), cpe, equation="bshr,btr->bsht"))
    scores = b("Mul", scores, b.attr_float("scale"))
    s = b.scalar(b.dim("q_latent", 1))
    limit = b("Add", b("Sub", b("Unsqueeze", lens, b.ints(1)), s), b("Unsqueeze", b("Range", zero, s, one), b.ints(0)))
    mask = b("Greater", tokens, b("Unsqueeze", limit, b.ints(2, 3)))  # [B, S, 1, T]: j > L - S + i
    p = b("Softmax", b("Where", mask, b.const(-np.inf), scores), axis=-1)
    b("CastLike", b("Einsum", p, ckv, equation="bsht,btc->bshc"), "q_latent", outs=["out"])
    return b.proto()


def moe_gate() -> FunctionProto:
    b = Body("moe_gate", ["x", "weight", "bias"], ["weights", "ids"],
             ("n_groups", "topk_groups", "topk", "route_scale", "norm_topk_prob"),
             "noaux_tc router: sigmoid scores, bias for selection only, group top-2 sums; weights renormalised "
             "over the top-k unless norm_topk_prob=0, then times route_scale", {"norm_topk_prob": 1})
    scores = b("Sigmoid", b("MatMul", b.f32("x"), b("Transpose", b.f32("weight"), perm=[1, 0])))  # [M, E]
    biased = b("Add", scores, b.f32("bias"))
    grouped = b("Reshape", biased, b("Concat", b.dim("x", 0), b.attr_int("n_groups", shape1=True), b.ints(-1),
                                     axis=0))  # [M, G, E/G]
    top2 = b("Min", b.dim(grouped, 2), b.ints(2))
    group_scores = b("ReduceSum", b("TopK", grouped, top2, axis=-1, outs=2)[0], b.ints(-1), keepdims=0)  # [M, G]
    keep = b("TopK", group_scores, b.attr_int("topk_groups", shape1=True), axis=-1, outs=2)[1]
    kept = b("ScatterElements", b("ConstantOfShape", b("Shape", group_scores)),
             keep, b("Expand", b.const(1.0), b("Shape", keep)), axis=1)
    masked = b("Where", b("Unsqueeze", b("Greater", kept, b.const(0.5)), b.ints(-1)), grouped, b.const(-np.inf))
    masked = b("Reshape", masked, b("Shape", biased))
    ids = b("TopK", masked, b.attr_int("topk", shape1=True), axis=-1, outs=2)[1]
    b("Identity", ids, outs=["ids"])
    w = b("GatherElements", scores, ids, axis=1)
    normed = b("Div", w, b("ReduceSum", w, b.ints(-1), keepdims=1))
    w = b("Where", b("Cast", b.attr_int("norm_topk_prob"), to=BOOL), normed, w)
    b("Mul", w, b.attr_float("route_scale"), outs=["weights"])
    return b.proto()


def _silu_mul(b: Body, g: str, u: str) -> str:
    """silu(g) * u in fp32, silu as g / (1 + exp(-g)), torch's formula: onnxruntime's Sigmoid differs from
    torch's silu in the last ulp on most inputs, this form on few (moe_experts_fp8 re-quantises the result,
    where a last-ulp difference at a rounding boundary moves an fp8 code)."""
    g = b.f32(g)
    return b("Mul", b("Div", g, b("Add", b.const(1.0), b("Exp", b("Neg", g)))), b.f32(u))


def silu_mul() -> FunctionProto:
    b = Body("silu_mul", ["x"], ["y"], (), "silu(x[..., :I]) * x[..., I:], fp32 math")
    g, u = b("Split", "x", axis=-1, num_outputs=2, outs=2)
    b("CastLike", _silu_mul(b, g, u), "x", outs=["y"])
    return b.proto()


def _pairs(b: Body):
    """Per (token, slot) pair p = m * k + slot: x rows [P, D], expert ids [P] (ids < 0 -> 0) and fp32 weights
    [P, 1] (0 for ids < 0)."""
    valid = b("GreaterOrEqual", "topk_ids", b.const(0, np.int64))
    ids = b("Reshape", b("Where", valid, "topk_ids", b.const(0, np.int64)), b.ints(-1))
    w = b("Mul", b.f32("topk_weights"), b("Cast", valid, to=FLOAT))
    w = b("Reshape", w, b.ints(-1, 1))
    xs = b("Expand", b("Unsqueeze", b.f32("x"), b.ints(1)),
           b("Concat", b.dim("x", 0), b.dim("topk_ids", 1), b.dim("x", 1), axis=0))
    return b("Reshape", xs, b("Concat", b.ints(-1), b.dim("x", 1), axis=0)), ids, w


def _experts_sum(b: Body, expert, xs: str, w: str):
    """SwiGLU per pair with outputs rounded to x's dtype; weighted fp32 sum over the k slots."""
    g = b("CastLike", expert(xs, "w1"), "x")
    u = b("CastLike", expert(xs, "w3"), "x")
    h = b("CastLike", _silu_mul(b, g, u), "x")
    o = b("Mul", b.f32(b("CastLike", expert(h, "w2"), "x")), w)  # [P, D]
    o = b("Reshape", o, b("Concat", b.dim("x", 0), b.dim("topk_ids", 1), b.dim("x", 1), axis=0))
    b("CastLike", b("ReduceSum", o, b.ints(1), keepdims=0), "x", outs=["y"])


def moe_experts() -> FunctionProto:
    b = Body("moe_experts", ["x", "topk_weights", "topk_ids", "w1", "w2", "w3"], ["y"], (),
             "routed SwiGLU experts, weighted and summed (gathered per (token, expert) pair)")
    xs, ids, w = _pairs(b)

    def expert(rows, name):  # rows [P, K] @ W[ids]^T -> [P, N], fp32
        return b("Einsum", b.f32(rows), b("Gather", b.f32(name), ids, axis=0), equation="pk,pnk->pn")

    _experts_sum(b, expert, xs, w)
    return b.proto()


def moe_experts_fp8() -> FunctionProto:
    b = Body("moe_experts_fp8", ["x", "topk_weights", "topk_ids", "w1", "w1_scale_inv", "w2", "w2_scale_inv",
                                 "w3", "w3_scale_inv"], ["y"], ("act_max", "fp8_type", "ue8m0"),
             "routed SwiGLU experts with W8A8 fp8 linears (act_quant 1x128, ue8m0=1: power-of-two scales; "
             "weights 128x128)", UE8M0)
    xs, ids, w = _pairs(b)

    def expert(rows, name):  # cpu_ref's per-pair fp8 linear: exact block dots, then the two scales
        codes, s = _act_quant(b, rows, 128)  # [P, K], [P, K/128]
        # Standard Gather has no fp8 types: cast the stacked codes [E, N, K] to fp32 (exact), then gather.
        wq = b("Gather", b.f32(name), ids, axis=0)  # [P, N, K]
        partial = _block_dots(b, codes, wq, "pbk,pnbk->pnb", (0, -1, 128), (0, 0, -1, 128))  # [P, N, KB]
        scale = b("Gather", b.f32(name + "_scale_inv"), ids, axis=0)  # [P, GN, GK]
        rows_scale = _expand_rows(b, scale, b("Shape", name, start=1, end=2), b.ints(128))  # [P, N, KB]
        return _scaled_sum(b, partial, b("Unsqueeze", s, b.ints(1)), rows_scale)

    _experts_sum(b, expert, xs, w)
    return b.proto()


def sample_greedy() -> FunctionProto:
    b = Body("sample_greedy", ["logits"], ["ids"], (), "temperature <= 0: argmax, lowest index wins a tie")
    b("ArgMax", b.f32("logits"), axis=-1, keepdims=0, select_last_index=0, outs=["ids"])
    return b.proto()


def all_reduce() -> FunctionProto:
    b = Body("all_reduce", ["x"], ["y"], (), "sum over ranks; identity in one process (replace for multi-device)")
    b("Identity", "x", outs=["y"])
    return b.proto()


def all_to_all() -> FunctionProto:
    b = Body("all_to_all", ["x"], ["y"], (), "row exchange between ranks; identity in one process")
    b("Identity", "x", outs=["y"])
    return b.proto()


BUILDERS: dict[str, Callable[[], FunctionProto]] = {
    f.__name__: f for f in (rms_norm, rms_norm_residual, rope, act_quant, weight_dequant, fp8_gemm, linear,
                            linear_fp8, mla_prefill, mla_decode, moe_gate, moe_experts, moe_experts_fp8, silu_mul,
                            sample_greedy, all_reduce, all_to_all)
}

# Which deepport-domain functions implement each op contract (variants by argument kind).
CONTRACT_FUNCTIONS = {
    "rms_norm": ("rms_norm", "rms_norm_residual"), "rope": ("rope",), "act_quant": ("act_quant",),
    "weight_dequant": ("weight_dequant",), "fp8_gemm": ("fp8_gemm",), "linear": ("linear", "linear_fp8"),
    "mla_prefill": ("mla_prefill",), "mla_decode": ("mla_decode",), "moe_gate": ("moe_gate",),
    "moe_experts": ("moe_experts", "moe_experts_fp8"), "silu_mul": ("silu_mul",), "sample": ("sample_greedy",),
    "all_reduce": ("all_reduce",), "all_to_all": ("all_to_all",),
}


def functions(overrides: dict[str, FunctionProto] | None = None) -> list[FunctionProto]:
    """Every deepport-domain function (callees included); `overrides` swaps in replacements by name."""
    out = {name: build() for name, build in BUILDERS.items()}
    out.update(overrides or {})
    return list(out.values())
