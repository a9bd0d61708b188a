"""The Triton op table shared by the cuda and rocm backends: deepport/kernels bound with one arch's tuning data.

A backend supplies only what differs: the compile target ("cuda" or "hip"), how to name the present
arch (sm90 -> 90, gfx942) and which section of its tuning.json that arch reads. sample and the
collectives are torch-native (backends/torch_common.py).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch

from deepport.backends import torch_common
from deepport.core.formats import Fp8Weight
from deepport.kernels import (act_quant as _act_quant, fp8_gemm as _fp8_gemm, mla_decode as _mla_decode,
                              mla_prefill as _mla_prefill, moe_experts as _moe_experts, moe_gate as _moe_gate,
                              rms_norm as _rms_norm, rope as _rope, silu_mul as _silu_mul,
                              weight_dequant as _weight_dequant)
from deepport.kernels.targets import check_fp8_format
from deepport.kernels.tuning import Tuning

FP8_NAMES = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e4m3fnuz: "e4m3fnuz"}


def build_ops(target: str, arch: Callable[[], int | str], tuning_path: Path,
              tuning_section: Callable[[int | str], str]) -> dict:
    """{op: fn} for one backend; every fn has its contract's parameter names."""

    @functools.cache
    def tuning(a) -> Tuning:
        return Tuning.load(tuning_path, tuning_section(a))

    def configs(op: str) -> list[dict]:
        return tuning(arch()).configs(op)

    def check_fp8(dtype: torch.dtype) -> None:
        check_fp8_format(target, arch(), FP8_NAMES[dtype])

    def rms_norm(x, weight, eps, residual=None):
        return _rms_norm.rms_norm(x, weight, eps, residual, configs=configs("rms_norm"))

    def rope(x, cos, sin):
        return _rope.rope(x, cos, sin, configs=configs("rope"))

    def act_quant(x, fmt, block=128, scale_fmt="fp32"):
        check_fp8(fmt.dtype)
        return _act_quant.act_quant(x, fmt, block, scale_fmt, configs=configs("act_quant"))

    def weight_dequant(w, scale_inv, block=128, out_dtype=torch.bfloat16):
        if w.dtype in FP8_NAMES:
            check_fp8(w.dtype)
        return _weight_dequant.weight_dequant(w, scale_inv, block, out_dtype, configs=configs("weight_dequant"))

    def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
        if a.dtype in FP8_NAMES:
            check_fp8(a.dtype)
        return _fp8_gemm.fp8_gemm(a, a_scale, b, b_scale, out_dtype, configs=configs("fp8_gemm"))

    def moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob=True):
        return _moe_gate.moe_gate(x, weight, bias, n_groups, topk_groups, topk, route_scale, norm_topk_prob,
                                  configs=configs("moe_gate"))

    def silu_mul(x):
        return _silu_mul.silu_mul(x, configs=configs("silu_mul"))

    def mla_prefill(q, k, v, causal, scale):
        return _mla_prefill.mla_prefill(q, k, v, causal, scale, configs=configs("mla_prefill"))

    def mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
        return _mla_decode.mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale,
                                      configs=configs("mla_decode"))

    def moe_experts(x, topk_weights, topk_ids, w1, w2, w3):
        if isinstance(w1, Fp8Weight):
            check_fp8(w1.weight.dtype)
        return _moe_experts.moe_experts(x, topk_weights, topk_ids, w1, w2, w3, configs=configs("moe_experts"))

    return {
        "rms_norm": rms_norm, "rope": rope, "act_quant": act_quant, "weight_dequant": weight_dequant,
        "fp8_gemm": fp8_gemm, "moe_gate": moe_gate, "silu_mul": silu_mul, "mla_prefill": mla_prefill,
        "mla_decode": mla_decode, "moe_experts": moe_experts,
        "sample": torch_common.sample, "all_reduce": torch_common.all_reduce, "all_to_all": torch_common.all_to_all,
    }
