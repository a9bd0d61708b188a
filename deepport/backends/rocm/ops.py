"""rocm ops: the same deepport/kernels bound with AMD tuning data (tuning.json), plus torch-native sample/collectives."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from deepport.backends import torch_common
from deepport.core import settings
from deepport.core.formats import Fp8Weight
from deepport.kernels import (act_quant as _act_quant, fp8_gemm as _fp8_gemm, moe_gate as _moe_gate,
                              rms_norm as _rms_norm, rope as _rope, silu_mul as _silu_mul,
                              weight_dequant as _weight_dequant)
from deepport.kernels import mla_decode as _mla_decode, mla_prefill as _mla_prefill, moe_experts as _moe_experts
from deepport.kernels.targets import check_fp8_format
from deepport.kernels.tuning import Tuning

TUNING_PATH = Path(__file__).with_name("tuning.json")
FP8_NAMES = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e4m3fnuz: "e4m3fnuz"}


@functools.cache
def _device_arch() -> str:
    return torch.cuda.get_device_properties(0).gcnArchName


def arch() -> str:
    """gcnArchName of the GPU; under TRITON_INTERPRET=1 the arch whose fp8 format the run uses
    (gfx942 for e4m3fnuz, the default; gfx950 for DEEPPORT_FP8_FORMAT=e4m3fn)."""
    if settings.triton_interpret():
        return "gfx950" if settings.interpret_fp8_format() == "e4m3fn" else "gfx942"
    return _device_arch()


@functools.cache
def tuning(gcn_arch: str) -> Tuning:
    return Tuning.load(TUNING_PATH, gcn_arch.split(":")[0])


def _configs(op: str) -> list[dict]:
    return tuning(arch()).configs(op)


def _check_fp8(dtype: torch.dtype) -> None:
    check_fp8_format("hip", arch(), FP8_NAMES[dtype])


def rms_norm(x, weight, eps, residual=None):
    return _rms_norm.rms_norm(x, weight, eps, residual, configs=_configs("rms_norm"))


def rope(x, cos, sin):
    return _rope.rope(x, cos, sin, configs=_configs("rope"))


def act_quant(x, fmt, block=128):
    _check_fp8(fmt.dtype)
    return _act_quant.act_quant(x, fmt, block, configs=_configs("act_quant"))


def weight_dequant(w, scale_inv, block=128, out_dtype=torch.bfloat16):
    if w.dtype in FP8_NAMES:
        _check_fp8(w.dtype)
    return _weight_dequant.weight_dequant(w, scale_inv, block, out_dtype, configs=_configs("weight_dequant"))


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    if a.dtype in FP8_NAMES:
        _check_fp8(a.dtype)
    return _fp8_gemm.fp8_gemm(a, a_scale, b, b_scale, out_dtype, configs=_configs("fp8_gemm"))


def moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale):
    return _moe_gate.moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, configs=_configs("moe_gate"))


def silu_mul(x):
    return _silu_mul.silu_mul(x, configs=_configs("silu_mul"))


def mla_prefill(q, k, v, causal, scale):
    return _mla_prefill.mla_prefill(q, k, v, causal, scale, configs=_configs("mla_prefill"))


def mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    return _mla_decode.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale,
                                  configs=_configs("mla_decode"))


def moe_experts(x, topk_weights, topk_ids, w1, w2, w3):
    if isinstance(w1, Fp8Weight):
        _check_fp8(w1.weight.dtype)
    return _moe_experts.moe_experts(x, topk_weights, topk_ids, w1, w2, w3, configs=_configs("moe_experts"))


OPS = {
    "rms_norm": rms_norm,
    "rope": rope,
    "act_quant": act_quant,
    "weight_dequant": weight_dequant,
    "fp8_gemm": fp8_gemm,
    "moe_gate": moe_gate,
    "silu_mul": silu_mul,
    "mla_prefill": mla_prefill,
    "mla_decode": mla_decode,
    "moe_experts": moe_experts,
    "sample": torch_common.sample,
    "all_reduce": torch_common.all_reduce,
    "all_to_all": torch_common.all_to_all,
}
