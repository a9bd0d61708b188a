"""cuda: NVIDIA GPUs through deepport's portable Triton kernels (fp8 needs sm89+, e4m3fn)."""
import importlib.util
from pathlib import Path

from deepport.core import settings
from deepport.core.registry import Backend, Probe


def probe() -> Probe:
    if importlib.util.find_spec("triton") is None:
        return Probe(False, "triton is not installed; pip install 'deepport[cuda]'")
    if settings.triton_interpret():
        return Probe(True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter on CPU tensors (correctness only)")
    import torch

    if torch.version.hip:
        return Probe(False, "this torch is a ROCm build; use --backend rocm")
    if not torch.cuda.is_available():
        return Probe(False, "no NVIDIA GPU visible to torch (torch.cuda.is_available() is False)")
    return Probe(True, f"{torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))})")


def fp8_format():
    if settings.triton_interpret():
        return "e4m3fn"
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        return "e4m3fn"
    return None  # fp8 tensor cores need sm89+ (Ada, Hopper, Blackwell)


def _load():
    from deepport.backends.cuda import ops

    return ops.OPS


BACKEND = Backend(
    name="cuda", device_type="cuda", probe=probe, load=_load, dtypes=frozenset({"fp8", "bf16", "fp32"}),
    fp8_format=fp8_format, dist_backend="nccl", origin="builtin", interpretable=True,
    conformance_toml=Path(__file__).with_name("conformance.toml"),
    description="NVIDIA GPUs via Triton kernels (deepport/kernels)",
)
