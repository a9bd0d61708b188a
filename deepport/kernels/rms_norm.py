"""rms_norm: y = x / rms(x) * weight, with an optional fused residual add (r = x + residual, rounded once)."""
import torch
import triton
import triton.language as tl

from deepport.core.errors import ContractError
from deepport.kernels.launch import launch
from deepport.kernels.rounding import round_for_store
from deepport.kernels.targets import CompileSpec

DEFAULT_CONFIGS = [{"num_warps": 8}]


@triton.jit
def rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, y_ptr, r_ptr, D, eps,
                    stride_x_m, stride_residual_m, stride_y_m, stride_r_m,
                    BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr, OUT_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x_m + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * stride_residual_m + offs, mask=mask, other=0.0).to(tl.float32)
        x = round_for_store(x + res, OUT_BF16)  # r is rounded once to x.dtype, and y is computed from it
        tl.store(r_ptr + row * stride_r_m + offs, x.to(r_ptr.dtype.element_ty), mask=mask)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / D
    y = x / tl.sqrt(mean_sq + eps) * w
    y = round_for_store(y, OUT_BF16)
    tl.store(y_ptr + row * stride_y_m + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t, d):
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(x, weight, eps, residual=None, *, configs=None):
    d = x.shape[-1]
    if d != weight.shape[0]:
        raise ContractError(f"rms_norm: x last dim {d} != weight dim {weight.shape[0]}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ContractError(f"rms_norm: x must be fp32 or bf16, got {x.dtype}; cast it first")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ContractError(f"rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x "
                            f"{tuple(x.shape)} {x.dtype}")
    x2 = _rows(x, d)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res2 = _rows(residual, d) if residual is not None else x2
    r = torch.empty_like(y) if residual is not None else y
    if y.numel():
        launch(rms_norm_kernel, lambda meta: (x2.shape[0],), configs or DEFAULT_CONFIGS,
               dict(x_ptr=x2, residual_ptr=res2, weight_ptr=weight.contiguous(), y_ptr=y, r_ptr=r, D=d,
                    eps=float(eps), stride_x_m=x2.stride(0), stride_residual_m=res2.stride(0),
                    stride_y_m=y.stride(0), stride_r_m=r.stride(0), BLOCK_D=triton.next_power_of_2(d),
                    HAS_RESIDUAL=residual is not None, OUT_BF16=x.dtype == torch.bfloat16))
    y = y.reshape(x.shape)
    return y if residual is None else (y, r.reshape(x.shape))


def compile_specs(target):
    sig = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "y_ptr": "*bf16", "r_ptr": "*bf16",
           "D": "i32", "eps": "fp32", "stride_x_m": "i32", "stride_residual_m": "i32", "stride_y_m": "i32",
           "stride_r_m": "i32", "BLOCK_D": "constexpr", "HAS_RESIDUAL": "constexpr", "OUT_BF16": "constexpr"}
    return [CompileSpec("rms_norm[bf16,residual]", rms_norm_kernel, sig,
                        {"BLOCK_D": 8192, "HAS_RESIDUAL": True, "OUT_BF16": True}, {"num_warps": 8})]
