"""weight_dequant: fp8 weight [N, K] x its block scales [ceil(N/block), ceil(K/block)] -> out_dtype."""
import torch
import triton
import triton.language as tl

from deepport.core.errors import ContractError
from deepport.core.formats import is_fp8, scale_grid
from deepport.kernels.launch import launch
from deepport.kernels.rounding import round_for_store
from deepport.kernels.targets import TRITON_FP8, CompileSpec, target_fp8

DEFAULT_CONFIGS = [{"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4}]
OUT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


@triton.jit
def weight_dequant_kernel(w_ptr, scale_ptr, out_ptr, N, K, stride_w_n, stride_scale_n, stride_out_n,
                          BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          OUT_BF16: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_w_n + offs_k[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_ptr + (offs_n // BLOCK)[:, None] * stride_scale_n + (offs_k // BLOCK)[None, :],
                    mask=mask, other=0.0)
    y = round_for_store(w.to(tl.float32) * scale, OUT_BF16)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_out_n + offs_k[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


def weight_dequant(w, scale_inv, block=128, out_dtype=torch.bfloat16, *, configs=None):
    if not is_fp8(w) or w.dim() != 2:
        raise ContractError(f"weight_dequant: w must be a 2-D fp8 tensor, got {w.dtype} {tuple(w.shape)}")
    want = scale_grid(*w.shape, block)
    if tuple(scale_inv.shape) != want:
        raise ContractError(f"weight_dequant: scale_inv shape {tuple(scale_inv.shape)} != {want} "
                            f"(ceil(N/{block}), ceil(K/{block})) for w {tuple(w.shape)}")
    n, k = w.shape
    kernel_dtype = out_dtype if out_dtype in OUT_DTYPES else torch.float32  # e.g. fp64: computed in fp32, cast
    w = w if w.stride(-1) == 1 else w.contiguous()
    scale = scale_inv.float().contiguous()
    out = torch.empty(n, k, dtype=kernel_dtype, device=w.device)
    if out.numel():
        launch(weight_dequant_kernel,
               lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"])),
               configs or DEFAULT_CONFIGS,
               dict(w_ptr=w, scale_ptr=scale, out_ptr=out, N=n, K=k, stride_w_n=w.stride(0),
                    stride_scale_n=scale.stride(0), stride_out_n=out.stride(0), BLOCK=block,
                    OUT_BF16=kernel_dtype == torch.bfloat16))
    return out if kernel_dtype == out_dtype else out.to(out_dtype)


def compile_specs(target):
    fp8 = TRITON_FP8[target_fp8(target)]
    sig = {"w_ptr": f"*{fp8}", "scale_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32", "K": "i32",
           "stride_w_n": "i32", "stride_scale_n": "i32", "stride_out_n": "i32", "BLOCK": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "OUT_BF16": "constexpr"}
    return [CompileSpec(f"weight_dequant[{target_fp8(target)}]", weight_dequant_kernel, sig,
                        {"BLOCK": 128, "BLOCK_N": 64, "BLOCK_K": 128, "OUT_BF16": True}, {"num_warps": 4})]
