"""act_quant: per-token, per-128-channel fp8 quantisation (s = max(amax, 1e-4) / act_max, rounded up to a power
of two for ue8m0; codes RTNE on the grid)."""
import torch
import triton
import triton.language as tl

from deepport.core.errors import ContractError
from deepport.core.formats import AMAX_FLOOR, Fp8Format, check_scale_fmt
from deepport.kernels.launch import launch
from deepport.kernels.rounding import round_scale_up_pow2, round_to_fp8_grid
from deepport.kernels.targets import TRITON_FP8, CompileSpec, target_fp8

DEFAULT_CONFIGS = [{"num_warps": 1}]
FP8_EMIN = {"e4m3fn": -6, "e4m3fnuz": -7}  # exponent of the smallest normal: fp8 ulp = 2^(max(e, EMIN) - 3)


@triton.jit
def act_quant_kernel(x_ptr, codes_ptr, s_ptr, K, stride_x_m, stride_codes_m, stride_s_m,
                     BLOCK: tl.constexpr, BLOCK_PAD: tl.constexpr, ACT_MAX: tl.constexpr,
                     FP8_EMIN: tl.constexpr, FP8_MAX: tl.constexpr, NEG_ZERO: tl.constexpr,
                     AMAX_FLOOR: tl.constexpr, SCALE_UE8M0: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    offs = kb * BLOCK + tl.arange(0, BLOCK_PAD)
    mask = tl.arange(0, BLOCK_PAD) < BLOCK
    x = tl.load(x_ptr + row * stride_x_m + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    s = tl.maximum(amax, AMAX_FLOOR) / ACT_MAX
    if SCALE_UE8M0:
        s = round_scale_up_pow2(s)
    y = round_to_fp8_grid(tl.math.div_rn(x, s), FP8_EMIN, FP8_MAX, NEG_ZERO)  # IEEE division, as the reference
    tl.store(codes_ptr + row * stride_codes_m + offs, y.to(codes_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_s_m + kb, s)


def act_quant(x, fmt: Fp8Format, block=128, scale_fmt="fp32", *, configs=None):
    k = x.shape[-1]
    if k % block:
        raise ContractError(f"act_quant: last dim {k} is not a multiple of the block {block}; pad K to a multiple of {block}")
    check_scale_fmt(scale_fmt, "act_quant")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ContractError(f"act_quant: x must be fp32/bf16/fp16, got {x.dtype}; cast it first")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    codes = torch.empty(m, k, dtype=fmt.dtype, device=x.device)
    s = torch.empty(m, k // block, dtype=torch.float32, device=x.device)
    if codes.numel():
        launch(act_quant_kernel, lambda meta: (m, k // block), configs or DEFAULT_CONFIGS,
               dict(x_ptr=x2, codes_ptr=codes, s_ptr=s, K=k, stride_x_m=x2.stride(0), stride_codes_m=codes.stride(0),
                    stride_s_m=s.stride(0), BLOCK=block, BLOCK_PAD=triton.next_power_of_2(block),
                    ACT_MAX=fmt.act_max, FP8_EMIN=FP8_EMIN[fmt.name], FP8_MAX=fmt.max, NEG_ZERO=fmt.name == "e4m3fn",
                    AMAX_FLOOR=AMAX_FLOOR, SCALE_UE8M0=scale_fmt == "ue8m0"))
    return codes.reshape(*x.shape), s.reshape(*x.shape[:-1], k // block)


def compile_specs(target):
    from deepport.core.formats import fp8_format

    fmt = fp8_format(target_fp8(target))
    sig = {"x_ptr": "*bf16", "codes_ptr": f"*{TRITON_FP8[fmt.name]}", "s_ptr": "*fp32", "K": "i32",
           "stride_x_m": "i32", "stride_codes_m": "i32", "stride_s_m": "i32", "BLOCK": "constexpr",
           "BLOCK_PAD": "constexpr", "ACT_MAX": "constexpr", "FP8_EMIN": "constexpr", "FP8_MAX": "constexpr",
           "NEG_ZERO": "constexpr", "AMAX_FLOOR": "constexpr", "SCALE_UE8M0": "constexpr"}
    consts = {"BLOCK": 128, "BLOCK_PAD": 128, "ACT_MAX": fmt.act_max, "FP8_EMIN": FP8_EMIN[fmt.name],
              "FP8_MAX": fmt.max, "NEG_ZERO": fmt.name == "e4m3fn", "AMAX_FLOOR": AMAX_FLOOR, "SCALE_UE8M0": False}
    expect = {"cuda": r"cvt\.rn\.satfinite\.e4m3x2\.f32",  # native fp32 -> e4m3 conversion on sm89+
              "gfx942": r"v_cvt_pk_fp8_f32", "gfx950": r"v_cvt_\w*pk_fp8_f32"}
    key = "cuda" if target.backend == "cuda" else str(target.arch)[:6]
    return [CompileSpec(f"act_quant[{fmt.name}]", act_quant_kernel, sig, consts, {"num_warps": 1},
                        (expect[key],) if key in expect else ())]
