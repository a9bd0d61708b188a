"""mla_prefill: flash-attention style causal attention over expanded per-head K/V (MLA's "MHA mode").

One program per (BLOCK_M queries, sequence x head). Online softmax in fp32; QK^T split into a power-of-two
head part plus a remainder (192 = 128 + 64 at 671B, 48 = 32 + 16 on the tiny preset) so no lane is padded.
Causal masking is bottom-right aligned: query i sees keys j <= (T - S) + i.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepport.core import settings
from deepport.core.errors import ContractError
from deepport.kernels.launch import launch
from deepport.kernels.rounding import round_for_store
from deepport.kernels.targets import CompileSpec

DEFAULT_CONFIGS = [{"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}]


@triton.jit
def mla_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, S, T, H, scale,
                       stride_q_b, stride_q_s, stride_q_h, stride_k_b, stride_k_t, stride_k_h,
                       stride_v_b, stride_v_t, stride_v_h, stride_o_b, stride_o_s, stride_o_h,
                       DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                       CAUSAL: tl.constexpr, LOWP_DOT: tl.constexpr, OUT_BF16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d1 = tl.arange(0, DK1)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < S
    q_base = q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_s
    q1 = tl.load(q_base + offs_d1[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
    if DK2 > 0:
        offs_d2 = DK1 + tl.arange(0, DK2)
        q2 = tl.load(q_base + offs_d2[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if CAUSAL:
        # the last key any row of this tile sees: (T - S) + last row
        n_end = tl.minimum(T, T - S + (pid_m + 1) * BLOCK_M)
    else:
        n_end = T
    for n0 in range(0, n_end, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < T
        k1 = tl.load(k_base + cols[:, None] * stride_k_t + offs_d1[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        if LOWP_DOT:
            s = tl.dot(q1.to(k_ptr.dtype.element_ty), tl.trans(k1.to(k_ptr.dtype.element_ty)))
        else:
            s = tl.dot(q1, tl.trans(k1), input_precision="ieee")
        if DK2 > 0:
            k2 = tl.load(k_base + cols[:, None] * stride_k_t + offs_d2[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            if LOWP_DOT:
                s += tl.dot(q2.to(k_ptr.dtype.element_ty), tl.trans(k2.to(k_ptr.dtype.element_ty)))
            else:
                s += tl.dot(q2, tl.trans(k2), input_precision="ieee")
        s = s * scale
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= (T - S) + offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_v_t + offs_dv[None, :],
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
        if LOWP_DOT:
            pv = tl.dot(p.to(v_ptr.dtype.element_ty), v.to(v_ptr.dtype.element_ty))
        else:
            pv = tl.dot(p, v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = round_for_store(acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None], OUT_BF16)
    o_ptrs = o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_s + offs_dv[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV))


def split_head_dim(dk: int) -> tuple[int, int]:
    """Dk as a power of two plus a power-of-two remainder (192 -> 128 + 64), or raise if that is impossible."""
    d1 = 1 << (dk.bit_length() - 1)
    d2 = dk - d1
    if d1 < 16 or (d2 and (d2 & (d2 - 1) or d2 < 16)):
        raise ContractError(f"mla_prefill kernel: head dim {dk} must be a power of two >= 16 plus an optional "
                            f"power-of-two remainder >= 16 (e.g. 192 = 128 + 64); use the cpu_ref fallback")
    return d1, d2


def _lowp_dot(dtype: torch.dtype) -> bool:
    """bf16/fp16 tensor-core dots on hardware; fp32 under the interpreter (its bf16 dot multiplies raw bits)."""
    return dtype in (torch.bfloat16, torch.float16) and not settings.triton_interpret()


def mla_prefill(q, k, v, causal, scale, *, configs=None):
    b, s, h, dk = q.shape
    t = k.shape[1]
    if k.shape != (b, t, h, dk) or v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ContractError(f"mla_prefill: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                            f"do not match q [B,S,H,Dk], k [B,T,H,Dk], v [B,T,H,Dv]")
    if causal and t < s:
        raise ContractError(f"mla_prefill: causal attention needs T >= S, got T={t}, S={s}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16):
        raise ContractError(f"mla_prefill: q, k, v must share one dtype, fp32 or bf16; got {q.dtype}, {k.dtype}, "
                            f"{v.dtype}")
    q, k, v = (t_ if t_.stride(-1) == 1 else t_.contiguous() for t_ in (q, k, v))
    dk1, dk2 = split_head_dim(dk)
    dv = v.shape[-1]
    out = torch.empty(b, s, h, dv, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    launch(mla_prefill_kernel, lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * h), configs or DEFAULT_CONFIGS,
           dict(q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, S=s, T=t, H=h, scale=float(scale),
                stride_q_b=q.stride(0), stride_q_s=q.stride(1), stride_q_h=q.stride(2),
                stride_k_b=k.stride(0), stride_k_t=k.stride(1), stride_k_h=k.stride(2),
                stride_v_b=v.stride(0), stride_v_t=v.stride(1), stride_v_h=v.stride(2),
                stride_o_b=out.stride(0), stride_o_s=out.stride(1), stride_o_h=out.stride(2),
                DK1=dk1, DK2=dk2, DV=dv, BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                CAUSAL=bool(causal), LOWP_DOT=_lowp_dot(q.dtype), OUT_BF16=q.dtype == torch.bfloat16),
           key=("S", "T", "H"))
    return out


def compile_specs(target):
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "S": "i32", "T": "i32", "H": "i32",
           "scale": "fp32", **{f"stride_{t}_{d}": "i32" for t, dims in (("q", "bsh"), ("k", "bth"), ("v", "bth"),
                                                                          ("o", "bsh")) for d in dims},
           **{c: "constexpr" for c in ("DK1", "DK2", "DV", "BLOCK_DV", "CAUSAL", "LOWP_DOT", "OUT_BF16",
                                       "BLOCK_M", "BLOCK_N")}}
    consts = {"DK1": 128, "DK2": 64, "DV": 128, "BLOCK_DV": 128, "CAUSAL": True, "LOWP_DOT": True, "OUT_BF16": True,
              "BLOCK_M": 64, "BLOCK_N": 64}
    if target.backend == "cuda":  # Hopper: warpgroup MMA on bf16 operands for both QK^T and PV
        opts, expect = {"num_warps": 4, "num_stages": 2}, (r"wgmma\.mma_async\S*\.f32\.bf16\.bf16",)
    else:  # CDNA3/CDNA4 bf16 MFMA; one stage for a fused two-GEMM loop (LDS budget)
        opts = {"num_warps": 4, "num_stages": 1, "matrix_instr_nonkdim": 16, "kpack": 1}
        expect = (r"v_mfma_f32_\w*bf16",)
    return [CompileSpec("mla_prefill[bf16,192/128,causal]", mla_prefill_kernel, sig, consts, opts, expect)]
