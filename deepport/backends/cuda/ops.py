"""cuda ops: deepport/kernels bound with this GPU's tuning data (tuning.json), plus torch-native sample/collectives."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from deepport.backends.triton_ops import build_ops
from deepport.core import settings

TUNING_PATH = Path(__file__).with_name("tuning.json")
INTERPRETER_ARCH = 90  # under TRITON_INTERPRET=1 the kernels stand in for an H100 (sm90, e4m3fn)


@functools.cache
def _device_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def arch() -> int:
    """Compute capability as an int (90 for H100)."""
    return INTERPRETER_ARCH if settings.triton_interpret() else _device_arch()


OPS = build_ops("cuda", arch, TUNING_PATH, lambda cc: f"sm{cc}")
