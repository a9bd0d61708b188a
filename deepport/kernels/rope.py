"""rope: DeepSeek's interleaved (pairwise) rotary embedding, out[2i], out[2i+1] = rotate(x[2i], x[2i+1]) by theta_i."""
import torch
import triton
import triton.language as tl

from deepport.core.errors import ContractError
from deepport.kernels.launch import launch
from deepport.kernels.rounding import round_for_store
from deepport.kernels.targets import CompileSpec

DEFAULT_CONFIGS = [{"BLOCK_H": 16, "num_warps": 4}]


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, S, H, HALF,
                stride_x_b, stride_x_s, stride_x_h, stride_cos_b, stride_cos_s, stride_sin_b, stride_sin_s,
                stride_out_b, stride_out_s, stride_out_h,
                BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr, OUT_BF16: tl.constexpr):
    pid = tl.program_id(0)
    b, s = (pid // S).to(tl.int64), (pid % S).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, HALF_PAD)
    mask_i = offs_i < HALF
    mask = (offs_h[:, None] < H) & mask_i[None, :]
    cos = tl.load(cos_ptr + b * stride_cos_b + s * stride_cos_s + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * stride_sin_b + s * stride_sin_s + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    x_even = x_ptr + b * stride_x_b + s * stride_x_s + offs_h[:, None] * stride_x_h + 2 * offs_i[None, :]
    x0 = tl.load(x_even, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_even + 1, mask=mask, other=0.0).to(tl.float32)
    y0 = round_for_store(x0 * cos[None, :] - x1 * sin[None, :], OUT_BF16)
    y1 = round_for_store(x0 * sin[None, :] + x1 * cos[None, :], OUT_BF16)
    out_even = out_ptr + b * stride_out_b + s * stride_out_s + offs_h[:, None] * stride_out_h + 2 * offs_i[None, :]
    tl.store(out_even, y0.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_even + 1, y1.to(out_ptr.dtype.element_ty), mask=mask)


def rope(x, cos, sin, *, configs=None):
    r = x.shape[-1]
    if x.dim() != 4:
        raise ContractError(f"rope: x must be [B, S, H, R], got {tuple(x.shape)}")
    if r % 2 or cos.shape[-1] != r // 2 or sin.shape != cos.shape:
        raise ContractError(f"rope: x rope dim {r} must be even and cos/sin last dim {r // 2}; "
                            f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    b, s, h, _ = x.shape
    if tuple(cos.shape[:2]) != (b, s):
        raise ContractError(f"rope: cos/sin {tuple(cos.shape)} must be [B={b}, S={s}, R/2={r // 2}]")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ContractError(f"rope: x must be fp32/bf16/fp16, got {x.dtype}; cast it first")
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    out = torch.empty(b, s, h, r, dtype=x.dtype, device=x.device)
    if out.numel():
        launch(rope_kernel, lambda meta: (b * s, triton.cdiv(h, meta["BLOCK_H"])), configs or DEFAULT_CONFIGS,
               dict(x_ptr=x, cos_ptr=cos, sin_ptr=sin, out_ptr=out, S=s, H=h, HALF=r // 2,
                    stride_x_b=x.stride(0), stride_x_s=x.stride(1), stride_x_h=x.stride(2),
                    stride_cos_b=cos.stride(0), stride_cos_s=cos.stride(1),
                    stride_sin_b=sin.stride(0), stride_sin_s=sin.stride(1),
                    stride_out_b=out.stride(0), stride_out_s=out.stride(1), stride_out_h=out.stride(2),
                    HALF_PAD=triton.next_power_of_2(r // 2), OUT_BF16=x.dtype == torch.bfloat16))
    return out


def compile_specs(target):
    sig = {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16", "S": "i32", "H": "i32",
           "HALF": "i32", **{f"stride_{t}_{d}": "i32" for t, dims in (("x", "bsh"), ("cos", "bs"), ("sin", "bs"),
                                                                       ("out", "bsh")) for d in dims},
           "BLOCK_H": "constexpr", "HALF_PAD": "constexpr", "OUT_BF16": "constexpr"}
    return [CompileSpec("rope[bf16]", rope_kernel, sig, {"BLOCK_H": 16, "HALF_PAD": 32, "OUT_BF16": True},
                        {"num_warps": 4})]
