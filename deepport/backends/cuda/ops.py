"""cuda ops: deepport/kernels bound with this GPU's tuning data (tuning.json), plus torch-native sample/collectives."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from deepport.backends import torch_common
from deepport.core import settings
from deepport.kernels import rms_norm as _rms_norm, silu_mul as _silu_mul
from deepport.kernels.targets import check_fp8_format
from deepport.kernels.tuning import Tuning

TUNING_PATH = Path(__file__).with_name("tuning.json")
INTERPRETER_ARCH = 90  # under TRITON_INTERPRET=1 the kernels stand in for an H100 (sm90, e4m3fn)


@functools.cache
def _device_arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def arch() -> int:
    """Compute capability as an int (90 for H100)."""
    return INTERPRETER_ARCH if settings.triton_interpret() else _device_arch()


@functools.cache
def tuning(cc: int) -> Tuning:
    return Tuning.load(TUNING_PATH, f"sm{cc}")


def _configs(op: str) -> list[dict]:
    return tuning(arch()).configs(op)


def _check_fp8(dtype: torch.dtype) -> None:
    check_fp8_format("cuda", arch(), {torch.float8_e4m3fn: "e4m3fn", torch.float8_e4m3fnuz: "e4m3fnuz"}[dtype])


def rms_norm(x, weight, eps, residual=None):
    return _rms_norm.rms_norm(x, weight, eps, residual, configs=_configs("rms_norm"))


def silu_mul(x):
    return _silu_mul.silu_mul(x, configs=_configs("silu_mul"))


OPS = {
    "rms_norm": rms_norm,
    "silu_mul": silu_mul,
    "sample": torch_common.sample,
    "all_reduce": torch_common.all_reduce,
    "all_to_all": torch_common.all_to_all,
}
