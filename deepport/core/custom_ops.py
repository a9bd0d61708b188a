"""Every op contract of core/ops.py as a torch.library custom op `deepport::<op>`, for torch.compile and graphs.

The schema of each op is derived from its contract's signature (a contract that gains a parameter gets it
here for free); an Fp8Weight argument crosses the boundary as its tensors (and its int/str fields), an
Fp8Format as its name, anything else a schema cannot type (a process group) as a handle. The first argument
names the bound implementation, so one op serves every backend in a process: at run time it calls that
backend's function (cpu_ref, a Triton host wrapper, a plugin's code) eagerly; to torch.compile it is one
opaque node whose output shapes and dtypes come from the fake implementation below, written from the shapes
and dtypes the contract documents. `wrap(table)` rebinds a registry.OpTable to these ops (registry.bind(...,
custom_ops=True)); backends write nothing for it. See docs/compile.md.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Callable

import torch

from deepport.core import ops as contracts
from deepport.core.errors import ContractError
from deepport.core.formats import Fp8Format, Fp8Weight, fp8_format

NAMESPACE = "deepport"
_NONE = type(None)
_MISSING = object()


# ---- argument kinds, derived from a contract's annotations ------------------------------------------

def _members(annotation) -> tuple[set, bool]:
    """(types of a possibly-Optional union, whether None is allowed)."""
    args = set(typing.get_args(annotation)) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else {annotation}
    return args - {_NONE}, _NONE in args


_SCALARS = {float: "float", int: "int", bool: "bool", str: "str", torch.dtype: "ScalarType"}


def _fp8_weight_fields() -> list[tuple[str, str]]:
    """(field, schema type) of Fp8Weight, from its dataclass fields: the tensors travel, then the plain fields."""
    hints = typing.get_type_hints(Fp8Weight)
    out = []
    for f in dataclasses.fields(Fp8Weight):
        t = hints[f.name]
        out.append((f.name, "Tensor?" if t is torch.Tensor else _SCALARS[t] + "?"))
    return out


# Computed once at import: typing.get_type_hints inside a traced call would break the graph.
_FP8_FIELDS = _fp8_weight_fields()


@dataclasses.dataclass(frozen=True)
class Param:
    """One contract parameter and how it crosses the op boundary."""

    name: str
    kind: str  # tensor | weight (Tensor or Fp8Weight) | format | scalar | int_list | generator | handle
    schema: tuple[str, ...]  # schema argument declarations it becomes
    default: object = _MISSING


def _param(p: inspect.Parameter) -> Param:
    members, optional = _members(p.annotation)
    default = _MISSING if p.default is inspect.Parameter.empty else p.default
    q = "?" if optional else ""
    if Fp8Weight in members:
        fields = _FP8_FIELDS
        decl = (f"Tensor {p.name}",) + tuple(f"{t} {p.name}_{f}" for f, t in fields[1:])
        return Param(p.name, "weight", decl, default)
    if members == {torch.Tensor}:
        return Param(p.name, "tensor", (f"Tensor{q} {p.name}",), default)
    if members == {Fp8Format}:
        return Param(p.name, "format", (f"str{q} {p.name}",), default)
    if len(members) == 1 and next(iter(members)) in _SCALARS:
        return Param(p.name, "scalar", (f"{_SCALARS[next(iter(members))]}{q} {p.name}",), default)
    if members == {torch.Generator}:
        return Param(p.name, "generator", (f"Generator? {p.name}",), default)
    if len(members) == 1 and typing.get_origin(next(iter(members))) is list and \
            typing.get_args(next(iter(members))) == (int,):
        return Param(p.name, "int_list", (f"int[] {p.name}",), default)
    return Param(p.name, "handle", (f"int {p.name}",), default)  # unannotated (group=None): a handle


# Results per op: how many tensors, and the parameter whose None drops the second one (rms_norm's residual).
RESULTS = {"rms_norm": 2, "act_quant": 2, "moe_gate": 2}
OPTIONAL_RESULT = {"rms_norm": "residual"}
# Contracts that may update an argument in place ("in place where possible"): the op works on a copy so
# that, to the compiler, it is functional.
COPY_IN = {"all_reduce": "x"}


@dataclasses.dataclass(frozen=True)
class Spec:
    op: str
    params: tuple[Param, ...]
    n_results: int

    @property
    def schema(self) -> str:
        args = ", ".join(("str impl",) + tuple(d for p in self.params for d in p.schema))
        rets = "Tensor" if self.n_results == 1 else "(" + ", ".join(["Tensor"] * self.n_results) + ")"
        return f"({args}) -> {rets}"


def spec(op: str) -> Spec:
    """The custom-op spec of contract `op`, derived from its signature."""
    sig = inspect.signature(contracts.CONTRACTS[op], eval_str=True)
    params = tuple(_param(p) for p in sig.parameters.values())
    return Spec(op, params, RESULTS.get(op, 1))


# ---- handles for arguments a schema cannot type --------------------------------------------------------

_HANDLES: list = [None]


def _handle(obj) -> int:
    if obj is None:
        return 0
    for i, h in enumerate(_HANDLES):
        if h is obj:
            return i
    _HANDLES.append(obj)
    return len(_HANDLES) - 1


# ---- crossing the boundary -----------------------------------------------------------------------------

def _flatten(s: Spec, values: list) -> list:
    """Contract-level values -> schema-level values."""
    flat = []
    for p, v in zip(s.params, values):
        if p.kind == "weight":
            if isinstance(v, Fp8Weight):
                flat += [getattr(v, f) for f, _ in _FP8_FIELDS]
            else:
                flat += [v] + [None] * (len(p.schema) - 1)
        elif p.kind == "format":
            flat.append(None if v is None else fp8_format(v).name)
        elif p.kind == "handle":
            flat.append(_handle(v))
        elif p.kind == "int_list":
            flat.append([int(i) for i in v])
        else:
            flat.append(v)
    return flat


def _unflatten(s: Spec, flat: tuple) -> list:
    """Schema-level values -> the contract-level values a backend's function takes."""
    values, i = [], 0
    for p in s.params:
        n = len(p.schema)
        chunk = flat[i:i + n]
        i += n
        if p.kind == "weight":
            values.append(chunk[0] if chunk[1] is None else
                          Fp8Weight(*chunk[:1], **{f: v for (f, _), v in zip(_FP8_FIELDS[1:], chunk[1:])}))
        elif p.kind == "format":
            values.append(None if chunk[0] is None else fp8_format(chunk[0]))
        elif p.kind == "handle":
            values.append(_HANDLES[chunk[0]])
        else:
            values.append(chunk[0])
    return values


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, Fp8Weight):
            out += [v.weight, v.scale_inv]
    return out


def _results(s: Spec, out, inputs: list[torch.Tensor], like: torch.Tensor):
    """A backend's return value as the schema's tensors: fixed arity, contiguous (the strides the fake
    implementations promise to the compiler), never aliasing an input."""
    outs = [o.contiguous() for o in (out if isinstance(out, (tuple, list)) else [out])]
    if len(outs) < s.n_results:  # rms_norm without residual: y only; an empty placeholder fills the slot
        outs += [like.new_empty(0)] * (s.n_results - len(outs))
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    outs = [o.clone() if o.numel() and o.untyped_storage().data_ptr() in ptrs else o for o in outs]
    return outs[0] if s.n_results == 1 else tuple(outs)


# ---- fake implementations, from the shapes and dtypes each contract documents -----------------------------

def _acc(*ts) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _like(x: torch.Tensor) -> torch.Tensor:
    """x's shape and dtype, contiguous (every result crosses the boundary contiguous: see _results)."""
    return x.new_empty(x.shape)


def _weight_rows(w) -> int:
    return w.shape[-2]


FAKES: dict[str, Callable[[dict], object]] = {
    # rms_norm: y [..., D] in x.dtype (and r alike with a residual)
    "rms_norm": lambda a: (_like(a["x"]), _like(a["x"]) if a["residual"] is not None else a["x"].new_empty(0)),
    "rope": lambda a: _like(a["x"]),  # x's shape and dtype
    # act_quant: codes [..., K] fmt.dtype; s [..., K/block] fp32
    "act_quant": lambda a: (a["x"].new_empty(a["x"].shape, dtype=fp8_format(a["fmt"]).dtype),
                            a["x"].new_empty(*a["x"].shape[:-1], a["x"].shape[-1] // a["block"], dtype=torch.float32)),
    "weight_dequant": lambda a: a["w"].new_empty(a["w"].shape, dtype=a["out_dtype"]),  # [N, K] out_dtype
    "fp8_gemm": lambda a: a["a"].new_empty(a["a"].shape[0], a["b"].shape[0], dtype=a["out_dtype"]),  # [M, N]
    "linear": lambda a: a["x"].new_empty(*a["x"].shape[:-1], _weight_rows(a["w"])),  # [..., N] x.dtype
    "mla_prefill": lambda a: a["q"].new_empty(*a["q"].shape[:3], a["v"].shape[-1]),  # [B, S, H, Dv] q.dtype
    "mla_decode": lambda a: _like(a["q_latent"]),  # [B, S, H, C] q_latent.dtype
    # moe_gate: weights [M, k] fp32 (fp64 for fp64 inputs, the conformance reference); ids [M, k] int64
    "moe_gate": lambda a: (a["x"].new_empty(a["x"].shape[0], a["topk"], dtype=_acc(a["x"], a["weight"])),
                           a["x"].new_empty(a["x"].shape[0], a["topk"], dtype=torch.int64)),
    "moe_experts": lambda a: _like(a["x"]),  # [M, D] x.dtype
    "silu_mul": lambda a: a["x"].new_empty(*a["x"].shape[:-1], a["x"].shape[-1] // 2),  # [..., I] x.dtype
    "sample": lambda a: a["logits"].new_empty(a["logits"].shape[:-1], dtype=torch.int64),  # [B] int64
    "all_reduce": lambda a: _like(a["x"]),
    # all_to_all: [sum(output_split_sizes), ...] (x itself, M rows, when not distributed)
    "all_to_all": lambda a: a["x"].new_empty(sum(a["output_split_sizes"]), *a["x"].shape[1:]),
}


def _reference_fake(op: str):
    """For a contract without a rule above: cpu_ref's code (the executable spec) run on fake tensors."""
    from deepport.backends.cpu_ref import ops as ref

    def fake(a):
        out = getattr(ref, op)(**a)
        return tuple(o.contiguous() for o in out) if isinstance(out, (tuple, list)) else out.contiguous()

    return fake


# ---- registration ---------------------------------------------------------------------------------------

_IMPLS: dict[str, Callable] = {}
_REGISTERED: dict[str, object] = {}


def _define(op: str):
    s = spec(op)
    fake_rule = FAKES.get(op) or _reference_fake(op)
    copy_in = COPY_IN.get(op)

    def impl(impl: str, *flat):
        fn = _IMPLS.get(impl)
        if fn is None:
            raise ContractError(f"deepport::{op}: no implementation bound as {impl!r}; bind the op table with "
                                f"deepport.core.registry.bind(..., custom_ops=True) in this process")
        values = _unflatten(s, flat)
        if copy_in is not None:
            i = [p.name for p in s.params].index(copy_in)
            values[i] = values[i].clone()
        inputs = _tensors(values)
        out = fn(*values)
        return _results(s, out, inputs, inputs[0])

    def fake(impl: str, *flat):
        values = _unflatten(s, flat)
        out = fake_rule({p.name: v for p, v in zip(s.params, values)})
        return out

    # A plain torch.library.Library definition (not torch.library.custom_op): one Python layer per call
    # instead of custom_op's autograd/inplace wrappers, measured ~30% less dispatch overhead per op on CPU.
    # The ops define no backward: as_custom_op calls the function directly while autograd records.
    _LIB.define(op + s.schema)
    _LIB.impl(op, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{op}", fake, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), op)


_LIB = None


def register_all() -> dict[str, object]:
    """Define deepport::<op> for every contract (once per process); returns {op: OpOverloadPacket}."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901 - kept for the process's lifetime
    for op in contracts.CONTRACTS:
        if op not in _REGISTERED:
            _REGISTERED[op] = _define(op)
    return dict(_REGISTERED)


def op_overload(op: str):
    register_all()
    return getattr(getattr(torch.ops, NAMESPACE), op).default


def _fingerprint() -> str:
    """A hash of this module and the contracts. It is part of every implementation key, a constant in each
    compiled graph, so Inductor's on-disk graph cache never serves code built against older fake
    implementations (whose output strides it asserts at run time)."""
    import hashlib
    from pathlib import Path

    return hashlib.sha1(Path(__file__).read_bytes() + Path(contracts.__file__).read_bytes()).hexdigest()[:10]


FINGERPRINT = _fingerprint()


def bind_impl(backend: str, op: str, fn: Callable) -> str:
    """Register `fn` as an implementation of deepport::<op>; returns its key (stable per function object)."""
    for key, f in _IMPLS.items():
        if f is fn and key.startswith(f"{backend}.{op}"):
            return key
    base = f"{backend}.{op}@{FINGERPRINT}"
    key, n = base, 1
    while key in _IMPLS:
        n += 1
        key = f"{base}#{n}"
    _IMPLS[key] = fn
    return key


def as_custom_op(op: str, fn: Callable, backend: str) -> Callable:
    """A function with contract `op`'s signature that calls `fn` through deepport::<op>.

    While autograd records (training), `fn` is called directly: the custom ops define no backward.
    """
    s = spec(op)
    overload = op_overload(op)
    key = bind_impl(backend, op, fn)
    names = [p.name for p in s.params]
    defaults = [p.default for p in s.params]
    drop = OPTIONAL_RESULT.get(op)
    drop_at = names.index(drop) if drop else -1

    def call(*args, **kwargs):
        values = list(args) + [kwargs.pop(n, d) for n, d in zip(names[len(args):], defaults[len(args):])]
        if kwargs or len(values) != len(names) or any(v is _MISSING for v in values):
            raise TypeError(f"{op}() takes ({', '.join(names)}); got {len(args)} positional and "
                            f"{', '.join(kwargs) or 'no unknown'} keyword arguments")
        if torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(values)):
            return fn(*values)
        out = overload(key, *_flatten(s, values))
        if drop_at >= 0 and values[drop_at] is None:
            return out[0]
        return out

    call.__name__, call.__doc__, call.__wrapped__ = op, contracts.CONTRACTS[op].__doc__, fn
    call.custom_op_key = key
    return call


def wrap(table) -> None:
    """Rebind every native or fallback op of a registry.OpTable to its deepport:: custom op, in place.

    Composites (linear built from act_quant + fp8_gemm) stay Python: they call the wrapped primitives.
    """
    for op, how in table.report.items():
        if how == "composite":
            continue
        fn = getattr(table, op)
        object.__setattr__(table, op, as_custom_op(op, fn, table.backend))
    table.custom_ops = True
