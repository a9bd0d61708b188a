"""silu_mul: SwiGLU's activation silu(x[..., :I]) * x[..., I:], fp32 math."""
import torch
import triton
import triton.language as tl

from deepport.core.errors import ContractError
from deepport.kernels.launch import launch
from deepport.kernels.rounding import round_for_store
from deepport.kernels.targets import CompileSpec

DEFAULT_CONFIGS = [{"BLOCK_I": 1024, "num_warps": 4}]


@triton.jit
def silu_mul_kernel(x_ptr, out_ptr, I, stride_x_m, stride_out_m,
                    BLOCK_I: tl.constexpr, OUT_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_x_m + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_m + I + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    y = round_for_store(y, OUT_BF16)
    tl.store(out_ptr + row * stride_out_m + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x, *, configs=None):
    if x.shape[-1] % 2:
        raise ContractError(f"silu_mul: last dim {x.shape[-1]} must be even ([gate ; up])")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ContractError(f"silu_mul: x must be fp32/bf16/fp16, got {x.dtype}; cast it first")
    i = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], i, dtype=x.dtype, device=x.device)
    if out.numel():
        launch(silu_mul_kernel, lambda meta: (x2.shape[0], triton.cdiv(i, meta["BLOCK_I"])),
               configs or DEFAULT_CONFIGS,
               dict(x_ptr=x2, out_ptr=out, I=i, stride_x_m=x2.stride(0), stride_out_m=out.stride(0),
                    OUT_BF16=x.dtype == torch.bfloat16))
    return out.reshape(*x.shape[:-1], i)


def compile_specs(target):
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "I": "i32", "stride_x_m": "i32", "stride_out_m": "i32",
           "BLOCK_I": "constexpr", "OUT_BF16": "constexpr"}
    return [CompileSpec("silu_mul[bf16]", silu_mul_kernel, sig, {"BLOCK_I": 1024, "OUT_BF16": True},
                        {"num_warps": 4})]
