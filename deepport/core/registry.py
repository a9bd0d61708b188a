"""Backend descriptors, pluggy discovery, selection, and binding of the op table."""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pluggy
import torch

from deepport.core import ops as contracts
from deepport.core import finite, plugins, settings
from deepport.core.errors import BackendError, ContractError, DeepportError
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
    compute_dtype: Callable[[], str] | None = None  # the dtype `--dtype auto` picks on this device (e.g. fp32
    #                                                 on a CPU without native bf16); None: checkpoint-driven
    traceable: bool = False  # its ops are plain torch code torch.compile can trace: --compile inlines them, so
    #                          Inductor fuses across ops (no opaque deepport:: custom ops; --graphs still wraps)
    keeps_fp8_codes: Callable[[str], bool] | None = None  # (served dtype) -> True: an FP8 checkpoint served in
    #   that dtype keeps the fp8 codes of its experts and large weights beside the dequantised ones
    #   (param.fp8_codes, core/checkpoint.py) for kernels that read them instead (cpu's C kernels, fp32: a
    #   quarter of the bytes); 1 byte per weight more. Such a backend also gets presets materialised in FP8

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


def _manager() -> tuple[pluggy.PluginManager, dict[str, str], dict[str, str]]:
    """The plugin manager with the built-ins and every entry point that imports; plus packages and failures."""
    pm = pluggy.PluginManager(plugins.PROJECT)
    pm.add_hookspecs(plugins)
    from deepport.backends import builtin

    pm.register(builtin, name="deepport.builtin")
    packages, failures = {"deepport.builtin": "deepport"}, {}
    if settings.plugins_autoload():
        found, failures = plugins.load_entry_points(pm)
        packages.update(found)
    return pm, packages, failures


def _broken(name: str, reason: str) -> Backend:
    """Stands in for a plugin that failed: listed by `deepport backends` as unavailable, with the reason."""

    def load():
        raise BackendError(reason)

    return Backend(name=name, device_type="unknown", probe=lambda: Probe(False, reason), load=load,
                   dtypes=frozenset(), origin="plugin", description=reason)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warn(msg)


def discover() -> dict[str, Backend]:
    """Every backend known through the plugin manager (built-ins first), by name.

    A plugin that fails to import or whose hook raises becomes an unavailable backend with the reason;
    two packages providing one name make it unavailable (a built-in name stays the built-in's)."""
    pm, packages, failures = _manager()
    found: dict[str, Backend] = {}
    owner: dict[str, str] = {}
    for impl in pm.hook.deepport_backends.get_hookimpls():  # registration order: built-ins first
        package = packages.get(impl.plugin_name, impl.plugin_name)
        try:
            batch = list(impl.function() or ())
        except (Exception, SystemExit) as e:
            failures[impl.plugin_name] = (f"plugin {impl.plugin_name!r} (package {package!r}) raised in "
                                          f"deepport_backends(): {type(e).__name__}: {e}; {plugins.HINT}")
            continue
        for b in batch:
            if not isinstance(b, Backend):
                failures[impl.plugin_name] = (f"plugin {impl.plugin_name!r} (package {package!r}) returned {b!r}; "
                                              f"it must return deepport.core.registry.Backend objects; {plugins.HINT}")
                continue
            if b.name in found:
                why = (f"backend {b.name!r} is provided by both package {owner[b.name]!r} and package {package!r}; "
                       f"uninstall one of them, or {plugins.HINT.split(', or ')[0]}")
                if found[b.name].origin == "builtin":
                    _warn_once(why + f" (using the built-in {b.name!r})")
                else:
                    found[b.name] = _broken(b.name, why)
                continue
            found[b.name], owner[b.name] = b, package
    for name, why in failures.items():
        if name not in found:
            found[name] = _broken(name, why)
        else:
            _warn_once(why)
    return found


_timed_out: dict[tuple[str, int], Probe] = {}


def safe_probe(b: Backend, timeout_s: float | None = None) -> Probe:
    """b.probe() in a thread with a timeout (DEEPPORT_PROBE_TIMEOUT, default 10 s): a probe that raises or
    hangs makes its backend unavailable with the reason, never takes deepport down."""
    key = (b.name, id(b.probe))
    if key in _timed_out:
        return _timed_out[key]
    timeout_s = settings.probe_timeout_s() if timeout_s is None else timeout_s
    box: list = []

    def run():
        try:
            box.append(b.probe())
        except BaseException as e:  # noqa: BLE001 - reported as the reason
            box.append(e)

    thread = threading.Thread(target=run, name=f"deepport-probe-{b.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        _timed_out[key] = Probe(False, f"probe timed out after {timeout_s:g}s (raise DEEPPORT_PROBE_TIMEOUT if the "
                                       f"device is just slow to answer; {plugins.HINT})")
        return _timed_out[key]
    p = box[0]
    if isinstance(p, BaseException):
        return Probe(False, f"probe raised {type(p).__name__}: {p}")
    if not isinstance(p, Probe):
        return Probe(False, f"probe returned {p!r}, not a deepport.core.registry.Probe")
    return p


def _loadable(b: Backend) -> bool:
    """Whether b loads (auto never picks a backend whose load fails; the failure is reported once)."""
    try:
        load_ops(b)
        return True
    except DeepportError as e:
        _warn_once(f"auto selection skips backend {b.name!r}: {e}")
        return False


def get_backend(name: str) -> Backend:
    backends = discover()
    if name not in backends:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(backends)} "
                           f"(install a plugin package to add one; see docs/PORTING.md)")
    return backends[name]


# Built-in CPU backends in auto's order when no accelerator is available: the fast path, then the spec.
CPU_DEFAULTS = ("cpu", "cpu_ref")


def select(name: str | None = None) -> Backend:
    """--backend NAME, else DEEPPORT_BACKEND, else auto: the one available accelerator backend (device type
    not cpu), else the built-in `cpu`, else cpu_ref. A plugin whose device is cpu is never picked by auto."""
    name = name if name not in (None, "auto") else settings.backend_name()
    if name and name != "auto":
        b = get_backend(name)
        p = safe_probe(b)
        if not p.available:
            raise BackendError(f"backend {name!r} is not available here: {p.reason}; "
                               f"run `deepport backends` to see what is, or pick --backend cpu_ref")
        return b
    backends = discover()
    usable = [b for b in backends.values()
              if b.device_type != "cpu" and b.name not in CPU_DEFAULTS and safe_probe(b).available
              and _loadable(b)]
    if len(usable) > 1:
        raise BackendError("several accelerator backends are available ("
                           + ", ".join(b.name for b in usable) + "); choose one with --backend or DEEPPORT_BACKEND")
    if usable:
        return usable[0]
    for name in CPU_DEFAULTS:
        b = backends.get(name)
        if b is not None and b.origin == "builtin" and safe_probe(b).available and _loadable(b):
            return b
    return backends["cpu_ref"]


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
    except (Exception, SystemExit) as e:
        hint = f"; {plugins.HINT}" if b.origin == "plugin" else ""
        raise BackendError(f"backend {b.name!r} failed to load: {type(e).__name__}: {e}{hint}") from e
    for op, fn in impls.items():
        impls[op] = contracts.check_signature(op, fn, b.name)  # adapts backends that predate late parameters
    return impls


@dataclass
class OpTable:
    """The bound op table: attribute per op, resolved once; `report` says native/composite/fallback per op."""

    backend: str
    device: torch.device
    fp8: Fp8Format | None
    report: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # op -> what actually runs it
    custom_ops: bool = False  # ops called through the deepport:: torch.library ops (bind(custom_ops=True))

    def __getattr__(self, name):  # only reached for unbound names
        raise BackendError(f"op {name!r} is not bound in backend {self.backend!r}; known ops: {', '.join(contracts.CONTRACTS)}")


def _composite_linear(table: OpTable):
    from deepport.core.formats import Fp8Weight

    def linear(x, w):
        if isinstance(w, Fp8Weight):
            lead, k = x.shape[:-1], x.shape[-1]
            codes, s = table.act_quant(x.reshape(-1, k), w.fmt, 128, w.scale_fmt)
            y = table.fp8_gemm(codes, s, w.weight, w.scale_inv, out_dtype=x.dtype)
            return y.reshape(*lead, y.shape[-1])
        return torch.nn.functional.linear(x, w.to(x.dtype))

    return linear


def bind(b: Backend, fallback: str = "reference", custom_ops: bool = False) -> OpTable:
    """Resolve every contract for backend b: native, composite, or (if allowed) cpu_ref fallback.

    custom_ops: call each op through its torch.library op deepport::<op> (core/custom_ops.py), which
    torch.compile and CUDA/HIP graphs treat as one opaque node; any backend, plugins included, gets it."""
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
    if custom_ops:
        from deepport.core import custom_ops as custom

        custom.wrap(table)
    if settings.check_finite():
        finite.wrap(table)  # DEEPPORT_CHECK_FINITE=1: every op checks its outputs for NaN/inf
    return table


def op_counts(b: Backend) -> dict[str, int]:
    """How many contracts a backend implements natively, as composites, or only through the fallback."""
    impls = load_ops(b)
    native = sum(op in impls for op in contracts.CONTRACTS)
    composite = sum(op not in impls for op in contracts.COMPOSITES)
    return {"native": native, "composite": composite, "fallback": len(contracts.CONTRACTS) - native - composite}


def warn(msg: str) -> None:
    print(f"deepport: {msg}", file=sys.stderr)
