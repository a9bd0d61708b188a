"""ascend: Huawei Ascend NPUs through torch_npu fused ops (BF16; FP8 checkpoints dequantised at load on 910B/C)."""
import importlib.util
import sys
from pathlib import Path

from deepport.backends.ascend import dtype_policy
from deepport.core.registry import Backend, Probe

NOT_INSTALLED = ("torch_npu is not installed; install the CANN toolkit (source <CANN>/set_env.sh), then "
                 "pip install 'deepport[ascend]'")


def _torch_npu():
    """The imported torch_npu module; raises what importing it raises (e.g. libhccl.so missing without CANN)."""
    import torch_npu

    return torch_npu


def is_stand_in() -> bool:
    """True when the torch_npu in use is the CPU stand-in from tests/npu_standin (never real hardware)."""
    mod = sys.modules.get("torch_npu")
    return bool(getattr(mod, "__deepport_stand_in__", False))


def probe() -> Probe:
    if importlib.util.find_spec("torch_npu") is None:
        return Probe(False, NOT_INSTALLED)
    try:
        torch_npu = _torch_npu()
    except Exception as e:  # without CANN: ImportError libhccl.so / RuntimeError from torch's backend autoload
        return Probe(False, f"torch_npu failed to import ({type(e).__name__}: {e}); install CANN and run "
                            f"`source <CANN>/set_env.sh` (and TORCH_DEVICE_BACKEND_AUTOLOAD=0 if `import torch` fails)")
    if not torch_npu.npu.is_available():
        return Probe(False, "torch_npu imported but no Ascend NPU is visible (check the driver, npu-smi info, "
                            "and ASCEND_RT_VISIBLE_DEVICES)")
    chip = dtype_policy.current_chip()
    if dtype_policy.unsupported_reason(chip):
        return Probe(False, f"{torch_npu.npu.get_device_name()}: {dtype_policy.unsupported_reason(chip)}")
    what = f"{torch_npu.npu.get_device_name()}; {dtype_policy.describe(chip)}"
    if is_stand_in():
        what = f"stand-in torch_npu (tests only, CPU tensors, results labelled stand-in): {what}"
    return Probe(True, what)


def evidence() -> str:
    """Report label: "stand-in" under the CPU stand-in, else the hardware the run used."""
    if is_stand_in():
        return "stand-in"
    try:
        return f"hardware: {_torch_npu().npu.get_device_name()}"
    except Exception:
        return "hardware: npu"


def _load():
    from deepport.backends.ascend import ops

    return ops.load()


BACKEND = Backend(
    name="ascend", device_type="npu", probe=probe, load=_load, dtypes=frozenset({"fp8", "bf16"}),
    fp8_format=dtype_policy.fp8_format, dist_backend="hccl", origin="builtin",
    conformance_toml=Path(__file__).with_name("conformance.toml"),
    description="Huawei Ascend NPUs via torch_npu fused ops (fp8 on Ascend 950 only)",
    evidence=evidence,
    sources=lambda: __import__("deepport.backends.ascend.ops", fromlist=["PROVENANCE"]).PROVENANCE,
)
