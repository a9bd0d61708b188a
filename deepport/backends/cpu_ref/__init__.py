"""cpu_ref: every op contract in plain torch, fp32 math; the executable spec and the fallback."""
from pathlib import Path

from deepport.core.registry import Backend, Probe


def _load():
    from deepport.backends.cpu_ref import ops
    from deepport.core.ops import CONTRACTS

    return {name: getattr(ops, name) for name in CONTRACTS if name != "linear"}


BACKEND = Backend(
    name="cpu_ref",
    device_type="cpu",
    probe=lambda: Probe(True, "plain torch; always available"),
    load=_load,
    dtypes=frozenset({"fp8", "bf16", "fp32"}),
    fp8_format="e4m3fn",
    dist_backend="gloo",
    origin="builtin",
    conformance_toml=Path(__file__).with_name("conformance.toml"),
    description="reference implementation (the spec); runs on any torch device",
)
