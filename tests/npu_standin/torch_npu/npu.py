"""torch_npu.npu device queries, answered for one pretend Ascend device (chip from NPU_STANDIN_SOC)."""
import os

_NAMES = {"910B": "Ascend910B3", "910C": "Ascend910_9382", "950": "Ascend950PR", "310P": "Ascend310P3"}


def get_soc_version() -> int:
    return int(os.environ.get("NPU_STANDIN_SOC", "223"))


def chip() -> str:
    soc = get_soc_version()
    for first, last, name in ((200, 205, "310P"), (220, 225, "910B"), (250, 255, "910C"), (260, 260, "950")):
        if first <= soc <= last:
            return name
    raise RuntimeError(f"torch_npu stand-in: NPU_STANDIN_SOC={soc} is no known Ascend SoC version")


def is_available() -> bool:
    return True


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def set_device(device) -> None:
    pass


def get_device_name(device=None) -> str:
    return f"{_NAMES[chip()]} (torch_npu stand-in on CPU)"
