"""moe_experts: fused routed experts (SwiGLU) over expert-sorted, block-padded (token, expert) pairs.

1. moe_align (device-side) sorts the pairs by expert and pads each expert's run to BLOCK_M rows.
2. moe_experts_gate_up_kernel: per (row block, I tile) of one expert, gathers the tokens' rows of x and
   computes gate = x w1^T and up = x w3^T (each rounded to x.dtype), then h = silu(gate) * up (rounded).
3. moe_experts_down_kernel: per (row block, D tile), out = h w2^T (rounded to x.dtype), times the pair's
   routing weight, atomically added in fp32 into y[token]; y is rounded once to x.dtype at the end.
fp8 weights (Fp8Weight, 128x128 block scales): activations are quantised 1x128 in the K loop exactly as
act_quant does (s = max(amax, 1e-4) / act_max, rounded up to a power of two when the weights' scale_fmt is
"ue8m0"; RTNE to the fp8 grid), the dot runs on fp8 operands and
each K block's partial sum is scaled by a_scale * b_scale (W8A8, DeepSeek's numerics).
The grid is sized by upper bounds; blocks past the last expert return at once. No host synchronisation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepport.core import settings
from deepport.core.errors import ContractError
from deepport.core.formats import FORMATS, FP8_BLOCK, Fp8Weight
from deepport.kernels.moe_align import moe_align
from deepport.kernels.rounding import round_for_store, round_scale_up_pow2, round_to_fp8_grid
from deepport.kernels.targets import CompileSpec, TRITON_FP8, target_fp8
from deepport.kernels.tuning import split_config

# BLOCK_K is used for bf16 weights; fp8 weights always step K by their 128-wide quantisation block.
DEFAULT_CONFIGS = [{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}]
FP8_EMIN = {"e4m3fn": -6, "e4m3fnuz": -7}  # exponent of the smallest normal


@triton.jit
def _quant_rows(a, ACT_MAX: tl.constexpr, FP8_EMIN: tl.constexpr, FP8_MAX: tl.constexpr, SCALE_UE8M0: tl.constexpr):
    """act_quant of a [BLOCK_M, 128] fp32 tile: (codes on the fp8 grid, still fp32; per-row scales)."""
    amax = tl.max(tl.abs(a), 1)
    s = tl.div_rn(tl.maximum(amax, 1e-4), ACT_MAX)  # formats.AMAX_FLOOR
    if SCALE_UE8M0:
        s = round_scale_up_pow2(s)
    codes = round_to_fp8_grid(tl.div_rn(a, s[:, None]), FP8_EMIN, FP8_MAX, False)  # the sign of 0 is moot in a dot
    return codes, s


@triton.jit
def _expert_dot(acc, a, a_scale, w_ptrs, w_mask, ws_ptrs, ws_mask, FP8: tl.constexpr, LOWP_DOT: tl.constexpr):
    """acc += a [BM, BK] @ w [BN, BK]^T for one K step (fp8: a holds codes on the grid; both scales applied)."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    if FP8:
        partial = tl.dot(a.to(w.dtype), tl.trans(w))
        b_scale = tl.load(ws_ptrs, mask=ws_mask, other=0.0)
        acc += partial * a_scale[:, None] * b_scale[None, :]
    elif LOWP_DOT:
        acc += tl.dot(a.to(w.dtype), tl.trans(w))
    else:
        acc += tl.dot(a, tl.trans(w.to(tl.float32)), input_precision="ieee")
    return acc


@triton.jit
def moe_experts_gate_up_kernel(x_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, sorted_ptr, block_expert_ptr,
                               N_PAIRS, TOPK, D, I,
                               stride_x_m, stride_w1_e, stride_w1_n, stride_w3_e, stride_w3_n,
                               stride_s1_e, stride_s1_n, stride_s3_e, stride_s3_n, stride_h_m,
                               FP8: tl.constexpr, LOWP_DOT: tl.constexpr, OUT_BF16: tl.constexpr,
                               ACT_MAX: tl.constexpr, FP8_EMIN: tl.constexpr, FP8_MAX: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               SCALE_UE8M0: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + rows)
    row_ok = pairs < N_PAIRS
    tok = (pairs // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < D
        a = tl.load(x_ptr + tok[:, None] * stride_x_m + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        a_scale = tl.full([BLOCK_M], 1.0, tl.float32)
        if FP8:  # act_quant once per K block, shared by gate and up
            a, a_scale = _quant_rows(a, ACT_MAX, FP8_EMIN, FP8_MAX, SCALE_UE8M0)
        w_mask = n_ok[:, None] & k_ok[None, :]
        kb = k0 // BLOCK_K
        acc_g = _expert_dot(acc_g, a, a_scale, w1_ptr + e * stride_w1_e + offs_n[:, None] * stride_w1_n + ks[None, :],
                            w_mask, s1_ptr + e * stride_s1_e + (offs_n // 128) * stride_s1_n + kb, n_ok, FP8, LOWP_DOT)
        acc_u = _expert_dot(acc_u, a, a_scale, w3_ptr + e * stride_w3_e + offs_n[:, None] * stride_w3_n + ks[None, :],
                            w_mask, s3_ptr + e * stride_s3_e + (offs_n // 128) * stride_s3_n + kb, n_ok, FP8, LOWP_DOT)
    gate = round_for_store(acc_g, OUT_BF16)  # linear(x, w1) is rounded to x.dtype
    up = round_for_store(acc_u, OUT_BF16)
    h = round_for_store(gate / (1.0 + tl.exp(-gate)) * up, OUT_BF16)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h_m + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_experts_down_kernel(h_ptr, w2_ptr, s2_ptr, y_ptr, tw_ptr, sorted_ptr, block_expert_ptr,
                            N_PAIRS, TOPK, D, I,
                            stride_h_m, stride_w2_e, stride_w2_n, stride_s2_e, stride_s2_n, stride_y_m,
                            FP8: tl.constexpr, LOWP_DOT: tl.constexpr, OUT_BF16: tl.constexpr,
                            ACT_MAX: tl.constexpr, FP8_EMIN: tl.constexpr, FP8_MAX: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SCALE_UE8M0: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + rows)
    row_ok = pairs < N_PAIRS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < I
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h_m + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        a_scale = tl.full([BLOCK_M], 1.0, tl.float32)
        if FP8:
            a, a_scale = _quant_rows(a, ACT_MAX, FP8_EMIN, FP8_MAX, SCALE_UE8M0)
        acc = _expert_dot(acc, a, a_scale, w2_ptr + e * stride_w2_e + offs_n[:, None] * stride_w2_n + ks[None, :],
                          n_ok[:, None] & k_ok[None, :],
                          s2_ptr + e * stride_s2_e + (offs_n // 128) * stride_s2_n + k0 // BLOCK_K, n_ok, FP8, LOWP_DOT)
    out = round_for_store(acc, OUT_BF16)  # linear(h, w2) is rounded to x.dtype before weighting
    weight = tl.load(tw_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
    tok = (pairs // TOPK).to(tl.int64)
    tl.atomic_add(y_ptr + tok[:, None] * stride_y_m + offs_n[None, :], out * weight[:, None],
                  mask=row_ok[:, None] & n_ok[None, :])


def _weights(w1, w2, w3):
    """(codes or tensors, scales or None, fp8 format name or None, scale_fmt) for the three expert weights."""
    kinds = {isinstance(w, Fp8Weight) for w in (w1, w2, w3)}
    if len(kinds) != 1:
        raise ContractError("moe_experts: w1, w2, w3 must all be Fp8Weight or all be tensors; quantise all three")
    if kinds == {True}:
        fmts = {w.fmt.name for w in (w1, w2, w3)}
        scale_fmts = {w.scale_fmt for w in (w1, w2, w3)}
        if len(fmts) != 1 or len(scale_fmts) != 1 or any(w.block != FP8_BLOCK for w in (w1, w2, w3)):
            raise ContractError(f"moe_experts: fp8 experts need one format, one scale_fmt and {FP8_BLOCK}x{FP8_BLOCK} "
                                f"blocks, got formats {sorted(fmts)}, scale_fmts {sorted(scale_fmts)}, "
                                f"blocks {[w.block for w in (w1, w2, w3)]}")
        return (w1.weight, w2.weight, w3.weight), (w1.scale_inv, w2.scale_inv, w3.scale_inv), fmts.pop(), scale_fmts.pop()
    return (w1, w2, w3), (None, None, None), None, "fp32"


def moe_experts(x, topk_weights, topk_ids, w1, w2, w3, *, configs=None):
    (c1, c2, c3), (s1, s2, s3), fmt, scale_fmt = _weights(w1, w2, w3)
    if x.dim() != 2:
        raise ContractError(f"moe_experts: x must be [M, D], got {tuple(x.shape)}; flatten the leading dims")
    m, d = x.shape
    if topk_weights.shape != topk_ids.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != m:
        raise ContractError(f"moe_experts: topk_weights {tuple(topk_weights.shape)} and topk_ids "
                            f"{tuple(topk_ids.shape)} must both be [M={m}, k]")
    if c1.dim() != 3 or c1.shape[-1] != d or c1.shape != c3.shape or c2.shape != (c1.shape[0], d, c1.shape[1]):
        raise ContractError(f"moe_experts: w1 {tuple(c1.shape)}, w3 {tuple(c3.shape)} must be [E, I, D={d}] and "
                            f"w2 {tuple(c2.shape)} [E, D, I]")
    n_experts, inter = c1.shape[0], c1.shape[1]
    if fmt is not None and (d % FP8_BLOCK or inter % FP8_BLOCK):
        raise ContractError(f"moe_experts: fp8 experts need D={d} and I={inter} to be multiples of {FP8_BLOCK} "
                            f"(the activation quantisation block); pad the weights or use bf16 experts")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ContractError(f"moe_experts: x must be fp32 or bf16, got {x.dtype}")
    if fmt is None and not (c1.dtype == c2.dtype == c3.dtype == x.dtype):
        raise ContractError(f"moe_experts: expert weights ({c1.dtype}, {c2.dtype}, {c3.dtype}) must be in x.dtype "
                            f"{x.dtype}; cast them once at load, not per call")
    for name, t in (("x", x), ("w1", c1), ("w2", c2), ("w3", c3)):
        if t.stride(-1) != 1:
            raise ContractError(f"moe_experts: {name} needs a contiguous last dim; call .contiguous() first")
    # One config: the atomic combine cannot be re-run by an autotuner's benchmark launches.
    constexprs, options = split_config({**DEFAULT_CONFIGS[0], **(configs or DEFAULT_CONFIGS)[0]})
    block_m, block_n = constexprs["BLOCK_M"], constexprs["BLOCK_N"]
    block_k = FP8_BLOCK if fmt is not None else constexprs["BLOCK_K"]

    n_pairs = topk_ids.numel()
    sorted_pairs, block_expert = moe_align(topk_ids, n_experts, block_m)
    n_blocks = block_expert.shape[0]
    y = torch.zeros(m, d, dtype=torch.float32, device=x.device)
    if n_blocks == 0 or m == 0:
        return y.to(x.dtype)
    h = torch.empty(n_blocks * block_m, inter, dtype=x.dtype, device=x.device)
    tw = topk_weights.reshape(-1)
    if tw.dtype != torch.float32 or not tw.is_contiguous():
        tw = tw.float().contiguous()
    fp8 = fmt is not None
    lowp = x.dtype == torch.bfloat16 and not settings.triton_interpret()
    dummy = torch.zeros(1, 1, 1, dtype=torch.float32, device=x.device)
    s1, s2, s3 = (s if s is not None else dummy for s in (s1, s2, s3))
    quant = dict(FP8=fp8, LOWP_DOT=lowp, OUT_BF16=x.dtype == torch.bfloat16,
                 ACT_MAX=FORMATS[fmt].act_max if fp8 else 448.0, FP8_EMIN=FP8_EMIN.get(fmt, -6),
                 FP8_MAX=FORMATS[fmt].max if fp8 else 448.0,
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SCALE_UE8M0=scale_fmt == "ue8m0")
    moe_experts_gate_up_kernel[(n_blocks, triton.cdiv(inter, block_n))](
        x, c1, c3, s1, s3, h, sorted_pairs, block_expert, n_pairs, topk_ids.shape[1], d, inter,
        x.stride(0), c1.stride(0), c1.stride(1), c3.stride(0), c3.stride(1),
        s1.stride(0), s1.stride(1), s3.stride(0), s3.stride(1), h.stride(0), **quant, **options)
    moe_experts_down_kernel[(n_blocks, triton.cdiv(d, block_n))](
        h, c2, s2, y, tw, sorted_pairs, block_expert, n_pairs, topk_ids.shape[1], d, inter,
        h.stride(0), c2.stride(0), c2.stride(1), s2.stride(0), s2.stride(1), y.stride(0), **quant, **options)
    return y.to(x.dtype)


def compile_specs(target):
    """Both grouped GEMMs in W8A8 with the target's fp8 format (fp8 MMA expected) and in bf16."""
    fmt = target_fp8(target)
    consts_common = {"LOWP_DOT": True, "OUT_BF16": True, "ACT_MAX": FORMATS[fmt].act_max,
                     "FP8_EMIN": FP8_EMIN[fmt], "FP8_MAX": FORMATS[fmt].max, "BLOCK_M": 64, "BLOCK_N": 128,
                     "SCALE_UE8M0": False}
    constexpr_names = ("FP8", "LOWP_DOT", "OUT_BF16", "ACT_MAX", "FP8_EMIN", "FP8_MAX", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                       "SCALE_UE8M0")
    if target.backend == "cuda":
        opts = {"num_warps": 4, "num_stages": 3}
        expect = {True: (r"wgmma\.mma_async\S*\.f32\.e4m3\.e4m3",), False: (r"wgmma\.mma_async\S*\.f32\.bf16\.bf16",)}
    else:
        opts = {"num_warps": 4, "num_stages": 2, "matrix_instr_nonkdim": 16, "kpack": 1}
        fp8_mfma = r"v_mfma_f32_\w+_fp8_fp8" if "gfx94" in target.arch else r"v_mfma_(scale_)?f32_\w+_f8f6f4"
        expect = {True: (fp8_mfma,), False: (r"v_mfma_f32_\w*bf16",)}
    specs = []
    for fp8 in (True, False):
        w = f"*{TRITON_FP8[fmt]}" if fp8 else "*bf16"
        consts = {**consts_common, "FP8": fp8, "BLOCK_K": FP8_BLOCK if fp8 else 64}
        gate_up = {"x_ptr": "*bf16", "w1_ptr": w, "w3_ptr": w, "s1_ptr": "*fp32", "s3_ptr": "*fp32", "h_ptr": "*bf16",
                   "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "N_PAIRS": "i32", "TOPK": "i32", "D": "i32",
                   "I": "i32", **{n: "i32" for n in ("stride_x_m", "stride_w1_e", "stride_w1_n", "stride_w3_e",
                                                     "stride_w3_n", "stride_s1_e", "stride_s1_n", "stride_s3_e",
                                                     "stride_s3_n", "stride_h_m")},
                   **{c: "constexpr" for c in constexpr_names}}
        down = {"h_ptr": "*bf16", "w2_ptr": w, "s2_ptr": "*fp32", "y_ptr": "*fp32", "tw_ptr": "*fp32",
                "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "N_PAIRS": "i32", "TOPK": "i32", "D": "i32",
                "I": "i32", **{n: "i32" for n in ("stride_h_m", "stride_w2_e", "stride_w2_n", "stride_s2_e",
                                                  "stride_s2_n", "stride_y_m")},
                **{c: "constexpr" for c in constexpr_names}}
        tag = fmt if fp8 else "bf16"
        specs += [CompileSpec(f"moe_experts_gate_up[{tag}]", moe_experts_gate_up_kernel, gate_up, consts, opts,
                              expect[fp8]),
                  CompileSpec(f"moe_experts_down[{tag}]", moe_experts_down_kernel, down, consts, opts, expect[fp8])]
    return specs
