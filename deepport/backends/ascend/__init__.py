"""ascend: Huawei Ascend NPUs through torch_npu fused ops (BF16; FP8 checkpoints dequantised at load on 910B/C)."""
import importlib.util
from pathlib import Path

from deepport.core.registry import Backend, Probe


def probe() -> Probe:
    if importlib.util.find_spec("torch_npu") is None:
        return Probe(False, "torch_npu is not installed; install CANN, then pip install 'deepport[ascend]'")
    try:
        import torch_npu  # noqa: F401
        import torch
    except Exception as e:  # missing CANN libraries surface here (e.g. libhccl.so)
        return Probe(False, f"torch_npu failed to import ({type(e).__name__}: {e}); source CANN's set_env.sh")
    if not torch.npu.is_available():
        return Probe(False, "torch_npu imported but no Ascend NPU is visible")
    return Probe(True, torch.npu.get_device_name())


def _load():
    from deepport.backends.ascend import ops

    return ops.load()


BACKEND = Backend(
    name="ascend", device_type="npu", probe=probe, load=_load, dtypes=frozenset({"bf16"}),
    fp8_format=None, dist_backend="hccl", origin="builtin",
    conformance_toml=Path(__file__).with_name("conformance.toml"),
    description="Huawei Ascend NPUs via torch_npu fused ops",
)
