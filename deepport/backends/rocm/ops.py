"""rocm ops: the same deepport/kernels bound with AMD tuning data (tuning.json), plus torch-native sample/collectives."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from deepport.backends.triton_ops import build_ops
from deepport.core import settings

TUNING_PATH = Path(__file__).with_name("tuning.json")


@functools.cache
def _device_arch() -> str:
    return torch.cuda.get_device_properties(0).gcnArchName


def arch() -> str:
    """gcnArchName of the GPU; under TRITON_INTERPRET=1 the arch whose fp8 format the run uses
    (gfx942 for e4m3fnuz, the default; gfx950 for DEEPPORT_FP8_FORMAT=e4m3fn)."""
    if settings.triton_interpret():
        return "gfx950" if settings.interpret_fp8_format() == "e4m3fn" else "gfx942"
    return _device_arch()


OPS = build_ops("hip", arch, TUNING_PATH, lambda gcn_arch: gcn_arch.split(":")[0])
