"""Backend descriptors, pluggy discovery, selection, and binding of the op table."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pluggy
import torch

from deepport.core import ops as contracts
from deepport.core import plugins, settings
from deepport.core.errors import BackendError, ContractError
from deepport.core.formats import Fp8Format, fp8_format

DTYPES = ("fp8", "bf16", "fp32")


@dataclass(frozen=True)
class Probe:
    """Outcome of a backend's cheap availability check."""

    available: bool
    reason: str = ""


@dataclass(frozen=True)
class Backend:
    """A backend: a small unit of fixed shape.

    name: one lowercase word. device_type: torch's device string (`cuda` for ROCm too, `npu`, `cpu`).
    probe(): cheap, imports nothing heavy. load(): returns {op: fn}; heavy imports happen there.
    dtypes: subset of {"fp8", "bf16", "fp32"}. fp8_format: a format name, or a callable resolving it on
    the present device (e.g. e4m3fnuz on gfx942), or None without fp8. dist_backend: torch.distributed
    backend name. conformance_toml: the backend's own xfail/tolerance overrides, each with a reason.
    """

    name: str
    device_type: str
    probe: Callable[[], Probe]
    load: Callable[[], dict]
    dtypes: frozenset = frozenset({"bf16"})
    fp8_format: str | Callable[[], str | None] | None = None
    dist_backend: str = "gloo"
    origin: str = "plugin"
    conformance_toml: str | Path | None = None
    description: str = ""
    interpretable: bool = False  # Triton backends: under TRITON_INTERPRET=1 they run on CPU tensors
    evidence: Callable[[], str] | None = None  # what a passing run proves, e.g. "stand-in", "hardware: H100"
    sources: Callable[[], dict] | None = None  # op -> what it runs (e.g. "torch_npu.npu_swiglu", "generic torch")

    def evidence_label(self) -> str:
        """How a conformance report labels results: interpreter, stand-in, reference or hardware: <device>."""
        if self.interpretable and settings.triton_interpret():
            return "interpreter"
        if self.evidence is not None:
            return self.evidence()
        if self.name == "cpu_ref":
            return "reference"
        return f"hardware: {self.device_type}"

    def resolve_fp8_format(self) -> Fp8Format | None:
        f = self.fp8_format() if callable(self.fp8_format) else self.fp8_format
        return fp8_format(f) if f else None

    def device(self) -> torch.device:
        if settings.device_override():
            return torch.device(settings.device_override())
        if self.interpretable and settings.triton_interpret():
            return torch.device("cpu")
        return torch.device(self.device_type)


def _manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(plugins.PROJECT)
    pm.add_hookspecs(plugins)
    from deepport.backends import builtin

    pm.register(builtin, name="deepport.builtin")
    if settings.plugins_autoload():
        pm.load_setuptools_entrypoints(plugins.ENTRY_POINT_GROUP)
    return pm


def discover() -> dict[str, Backend]:
    """Every backend known through the plugin manager (built-ins first), by name."""
    found: dict[str, Backend] = {}
    for batch in reversed(_manager().hook.deepport_backends()):
        for b in batch or ():
            if not isinstance(b, Backend):
                raise BackendError(f"a deepport plugin returned {b!r}; return deepport.core.registry.Backend objects")
            if b.name in found:
                raise BackendError(f"two plugins both provide backend {b.name!r}; uninstall one of them")
            found[b.name] = b
    return found


def safe_probe(b: Backend) -> Probe:
    try:
        return b.probe()
    except Exception as e:  # a probe must never take deepport down
        return Probe(False, f"probe raised {type(e).__name__}: {e}")


def get_backend(name: str) -> Backend:
    backends = discover()
    if name not in backends:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(backends)} "
                           f"(install a plugin package to add one; see docs/PORTING.md)")
    return backends[name]


def select(name: str | None = None) -> Backend:
    """--backend NAME, else DEEPPORT_BACKEND, else auto: the one available accelerator backend, else cpu_ref."""
    name = name if name not in (None, "auto") else settings.backend_name()
    if name and name != "auto":
        b = get_backend(name)
        p = safe_probe(b)
        if not p.available:
            raise BackendError(f"backend {name!r} is not available here: {p.reason}; "
                               f"run `deepport backends` to see what is, or pick --backend cpu_ref")
        return b
    backends = discover()
    usable = [b for b in backends.values() if b.name != "cpu_ref" and safe_probe(b).available]
    if len(usable) > 1:
        raise BackendError("several accelerator backends are available ("
                           + ", ".join(b.name for b in usable) + "); choose one with --backend or DEEPPORT_BACKEND")
    return usable[0] if usable else backends["cpu_ref"]


def check_dtype(b: Backend, dtype: str) -> None:
    if dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype not in b.dtypes:
        raise BackendError(f"backend {b.name!r} does not support dtype {dtype}; use --dtype "
                           + " or --dtype ".join(d for d in DTYPES if d in b.dtypes))
    if dtype == "fp8" and b.resolve_fp8_format() is None:
        raise BackendError(f"backend {b.name!r} has no fp8 format on this device; use --dtype bf16")


def load_ops(b: Backend) -> dict[str, Callable]:
    """Load a backend's implementations and check each against its contract."""
    try:
        impls = dict(b.load())
    except ContractError:
        raise
    except Exception as e:
        raise BackendError(f"backend {b.name!r} failed to load: {type(e).__name__}: {e}") from e
    for op, fn in impls.items():
        contracts.check_signature(op, fn, b.name)
    return impls


@dataclass
class OpTable:
    """The bound op table: attribute per op, resolved once; `report` says native/composite/fallback per op."""

    backend: str
    device: torch.device
    fp8: Fp8Format | None
    report: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # op -> what actually runs it

    def __getattr__(self, name):  # only reached for unbound names
        raise BackendError(f"op {name!r} is not bound in backend {self.backend!r}; known ops: {', '.join(contracts.CONTRACTS)}")


def _composite_linear(table: OpTable):
    from deepport.core.formats import Fp8Weight

    def linear(x, w):
        if isinstance(w, Fp8Weight):
            lead, k = x.shape[:-1], x.shape[-1]
            codes, s = table.act_quant(x.reshape(-1, k), w.fmt)
            y = table.fp8_gemm(codes, s, w.weight, w.scale_inv, out_dtype=x.dtype)
            return y.reshape(*lead, y.shape[-1])
        return torch.nn.functional.linear(x, w.to(x.dtype))

    return linear


def bind(b: Backend, fallback: str = "reference") -> OpTable:
    """Resolve every contract for backend b: native, composite, or (if allowed) cpu_ref fallback."""
    if fallback not in ("reference", "error"):
        raise BackendError(f"unknown fallback policy {fallback!r}; use 'reference' or 'error'")
    impls = load_ops(b)
    ref = None
    table = OpTable(b.name, b.device(), b.resolve_fp8_format())
    missing = []
    described = b.sources() if b.sources is not None else {}
    for op in contracts.CONTRACTS:
        if op in impls:
            fn, how = impls[op], "native"
        elif op == "linear":
            fn, how = _composite_linear(table), "composite"
        elif fallback == "reference" or b.name == "cpu_ref":
            if ref is None:
                from deepport.backends.cpu_ref import ops as ref
            fn, how = getattr(ref, op), "fallback"
        else:
            missing.append(op)
            continue
        object.__setattr__(table, op, fn)
        table.report[op] = how
        table.sources[op] = {"native": described.get(op, f"{b.name} native"), "composite": "act_quant + fp8_gemm",
                             "fallback": "cpu_ref fallback"}[how]
    if missing:
        raise BackendError(f"backend {b.name!r} lacks ops {', '.join(missing)} and --fallback error forbids "
                           f"the cpu_ref fallback; use --fallback reference or implement them")
    return table


def op_counts(b: Backend) -> dict[str, int]:
    """How many contracts a backend implements natively, as composites, or only through the fallback."""
    impls = load_ops(b)
    native = sum(op in impls for op in contracts.CONTRACTS)
    composite = sum(op not in impls for op in contracts.COMPOSITES)
    return {"native": native, "composite": composite, "fallback": len(contracts.CONTRACTS) - native - composite}


def warn(msg: str) -> None:
    print(f"deepport: {msg}", file=sys.stderr)
