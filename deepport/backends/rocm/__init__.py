"""rocm: AMD Instinct GPUs through the same Triton kernels (e4m3fnuz on gfx942, e4m3fn on gfx950)."""
import importlib.util
from pathlib import Path

from deepport.core import settings
from deepport.core.registry import Backend, Probe


def probe() -> Probe:
    if importlib.util.find_spec("triton") is None:
        return Probe(False, "triton is not installed; pip install 'deepport[rocm]'")
    if settings.triton_interpret():
        return Probe(True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter on CPU tensors (correctness only)")
    import torch

    if not torch.version.hip:
        return Probe(False, "this torch is not a ROCm build (torch.version.hip is None); install torch for ROCm")
    if not torch.cuda.is_available():
        return Probe(False, "no AMD GPU visible to torch")
    return Probe(True, torch.cuda.get_device_properties(0).gcnArchName)


def arch() -> str | None:
    import torch

    if torch.version.hip and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).gcnArchName
    return None


def fp8_format():
    if settings.triton_interpret():
        return settings.interpret_fp8_format() or "e4m3fnuz"
    name = arch() or ""
    if "gfx94" in name:
        return "e4m3fnuz"
    if "gfx95" in name:
        return "e4m3fn"
    return None  # no fp8 matrix cores before CDNA3


def _load():
    from deepport.backends.rocm import ops

    return ops.OPS


BACKEND = Backend(
    name="rocm", device_type="cuda", probe=probe, load=_load, dtypes=frozenset({"fp8", "bf16", "fp32"}),
    fp8_format=fp8_format, dist_backend="nccl", origin="builtin", interpretable=True,
    conformance_toml=Path(__file__).with_name("conformance.toml"),
    description="AMD GPUs via Triton kernels (deepport/kernels), RCCL behind the nccl name",
)
