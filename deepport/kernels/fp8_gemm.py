"""fp8_gemm: block-scaled C = A @ B^T (A 1x128 scales, B 128x128 scales), fp32 accumulation promoted per K block."""
import torch
import triton
import triton.language as tl

from deepport.core.errors import ContractError
from deepport.core.formats import is_fp8, scale_grid
from deepport.kernels.launch import launch
from deepport.kernels.rounding import round_for_store
from deepport.kernels.targets import TRITON_FP8, CompileSpec, target_fp8

SCALE_BLOCK = 128  # the K (and B's N) granularity of the scales: one K step of the kernel
DEFAULT_CONFIGS = [{"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}]
OUT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


@triton.jit
def fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, M, N, K,
                    stride_a_m, stride_b_n, stride_c_m, stride_a_scale_m, stride_b_scale_n,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                    SCALE_BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
    # grouped ordering of the output tiles: GROUP_M row-tiles share B tiles in L2
    pid = tl.program_id(0)
    n_tiles_m, n_tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * n_tiles_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, SCALE_BLOCK)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_a_m + offs_k[None, :]  # [BLOCK_M, 128]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_b_n + offs_k[:, None]  # [128, BLOCK_N] = B^T tile
    a_scale_ptrs = a_scale_ptr + offs_m * stride_a_scale_m
    b_scale_ptrs = b_scale_ptr + (offs_n // SCALE_BLOCK) * stride_b_scale_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // SCALE_BLOCK):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        a_s = tl.load(a_scale_ptrs + kb, mask=mask_m, other=0.0)
        b_s = tl.load(b_scale_ptrs + kb, mask=mask_n, other=0.0)
        # exact fp8 products summed in fp32 over one 128-block, then promoted with both scales
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        a_ptrs += SCALE_BLOCK
        b_ptrs += SCALE_BLOCK
    c = round_for_store(acc, OUT_BF16)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_c_m + offs_n[None, :]
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _check(a, a_scale, b, b_scale):
    if not (is_fp8(a) and is_fp8(b)) or a.dtype != b.dtype:
        raise ContractError(f"fp8_gemm: a and b must share one fp8 dtype, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2:
        raise ContractError(f"fp8_gemm: a [M, K] and b [N, K] must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[0]
    if k % SCALE_BLOCK or b.shape[1] != k:
        raise ContractError(f"fp8_gemm: K must match and be a multiple of 128; a {tuple(a.shape)}, b {tuple(b.shape)}")
    if tuple(a_scale.shape) != (m, k // SCALE_BLOCK) or tuple(b_scale.shape) != scale_grid(n, k):
        raise ContractError(f"fp8_gemm: scales {tuple(a_scale.shape)} / {tuple(b_scale.shape)} do not match "
                            f"a [M, K/128] = {(m, k // SCALE_BLOCK)} / b [ceil(N/128), K/128] = {scale_grid(n, k)}")


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, *, configs=None):
    _check(a, a_scale, b, b_scale)
    m, k = a.shape
    n = b.shape[0]
    kernel_dtype = out_dtype if out_dtype in OUT_DTYPES else torch.float32  # e.g. fp64: computed in fp32, cast
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    c = torch.empty(m, n, dtype=kernel_dtype, device=a.device)
    if c.numel():
        launch(fp8_gemm_kernel,
               lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
               configs or DEFAULT_CONFIGS,
               dict(a_ptr=a, b_ptr=b, c_ptr=c, a_scale_ptr=a_scale, b_scale_ptr=b_scale, M=m, N=n, K=k,
                    stride_a_m=a.stride(0), stride_b_n=b.stride(0), stride_c_m=c.stride(0),
                    stride_a_scale_m=a_scale.stride(0), stride_b_scale_n=b_scale.stride(0),
                    SCALE_BLOCK=SCALE_BLOCK, OUT_BF16=kernel_dtype == torch.bfloat16),
               key=("M", "N", "K"))
    return c if kernel_dtype == out_dtype else c.to(out_dtype)


def compile_specs(target):
    fmt = target_fp8(target)
    fp8 = TRITON_FP8[fmt]
    sig = {"a_ptr": f"*{fp8}", "b_ptr": f"*{fp8}", "c_ptr": "*bf16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "stride_a_m": "i32", "stride_b_n": "i32", "stride_c_m": "i32",
           "stride_a_scale_m": "i32", "stride_b_scale_n": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "GROUP_M": "constexpr", "SCALE_BLOCK": "constexpr", "OUT_BF16": "constexpr"}
    consts = {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "SCALE_BLOCK": SCALE_BLOCK, "OUT_BF16": True}
    if target.backend == "cuda":  # Hopper: warpgroup MMA on e4m3 operands
        opts, expect = {"num_warps": 4, "num_stages": 3}, (r"wgmma\.mma_async\S*\.f32\.e4m3\.e4m3",)
    elif "gfx94" in target.arch:  # MI300: native fnuz fp8 MFMA
        opts, expect = {"num_warps": 4, "num_stages": 2, "matrix_instr_nonkdim": 16}, (r"v_mfma_f32_\w+_fp8_fp8",)
    else:  # MI355 (gfx950): OCP fp8 through the f8f6f4 MFMA, kpack must be 1
        opts = {"num_warps": 4, "num_stages": 2, "matrix_instr_nonkdim": 16, "kpack": 1}
        expect = (r"v_mfma_(scale_)?f32_\w+_f8f6f4",)
    return [CompileSpec(f"fp8_gemm[{fmt}]", fp8_gemm_kernel, sig, consts, opts, expect)]
