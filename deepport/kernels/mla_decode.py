"""mla_decode: absorbed MLA over the paged latent cache (576 = latent 512 + rope 64 for scores, 512 for values).

Split-KV: `mla_decode_kernel` runs one program per (sequence, BLOCK_M rows of S*H queries, KV split); each
split walks its share of the sequence through the block table and leaves an unnormalised fp32 partial
output with its running max and sum. `mla_decode_combine_kernel` merges the splits (log-sum-exp).
The grid is sized from the block table's shape (an upper bound), never from seq_lens, so the host
never synchronises; splits past a sequence's end write an empty partial.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepport.core import settings
from deepport.core.errors import ContractError
from deepport.kernels.rounding import round_for_store
from deepport.kernels.targets import CompileSpec
from deepport.kernels.tuning import split_config

# BLOCK_M rows of the flattened (S, H) queries per program; BLOCK_N cached tokens per step; up to
# MAX_SPLITS KV splits, each at least MIN_SPLIT_TOKENS long, and no more than it takes to reach TARGET_PROGRAMS
# programs (about two waves of the device's SMs/CUs: a batch that fills the device alone needs no split and
# its partial-output traffic).
DEFAULT_CONFIGS = [{"BLOCK_M": 16, "BLOCK_N": 32, "MAX_SPLITS": 16, "MIN_SPLIT_TOKENS": 256,
                    "TARGET_PROGRAMS": 256, "num_warps": 4, "num_stages": 2}]


@triton.jit
def mla_decode_kernel(ql_ptr, qpe_ptr, kv_ptr, pe_ptr, bt_ptr, lens_ptr, part_o_ptr, part_ml_ptr,
                      S, H, scale, SPLIT_LEN,
                      stride_ql_b, stride_ql_s, stride_ql_h, stride_qpe_b, stride_qpe_s, stride_qpe_h,
                      stride_kv_nb, stride_kv_p, stride_pe_nb, stride_pe_p, stride_bt_b,
                      stride_po_b, stride_po_r, stride_po_s, stride_pml_b, stride_pml_r, stride_pml_s,
                      C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                      P: tl.constexpr, LOWP_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row = i * H + h
    row_ok = rows < S * H
    qi = rows // H
    qh = rows % H
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < C
    r_ok = offs_r < R
    ql = tl.load(ql_ptr + b * stride_ql_b + qi[:, None] * stride_ql_s + qh[:, None] * stride_ql_h + offs_c[None, :],
                 mask=row_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    qpe = tl.load(qpe_ptr + b * stride_qpe_b + qi[:, None] * stride_qpe_s + qh[:, None] * stride_qpe_h + offs_r[None, :],
                  mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    # query i sees tokens j <= length - S + i
    last = length - S + qi

    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        tok_ok = tok < end
        blk = tl.load(bt_ptr + b * stride_bt_b + tok // P, mask=tok_ok, other=0).to(tl.int64)
        slot = tok % P
        ckv = tl.load(kv_ptr + blk[:, None] * stride_kv_nb + slot[:, None] * stride_kv_p + offs_c[None, :],
                      mask=tok_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        cpe = tl.load(pe_ptr + blk[:, None] * stride_pe_nb + slot[:, None] * stride_pe_p + offs_r[None, :],
                      mask=tok_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        if LOWP_DOT:
            s = tl.dot(ql.to(kv_ptr.dtype.element_ty), tl.trans(ckv.to(kv_ptr.dtype.element_ty)))
            s += tl.dot(qpe.to(pe_ptr.dtype.element_ty), tl.trans(cpe.to(pe_ptr.dtype.element_ty)))
        else:
            s = tl.dot(ql, tl.trans(ckv), input_precision="ieee")
            s += tl.dot(qpe, tl.trans(cpe), input_precision="ieee")
        s = s * scale
        visible = tok_ok[None, :] & (tok[None, :] <= last[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if LOWP_DOT:
            pv = tl.dot(p.to(kv_ptr.dtype.element_ty), ckv.to(kv_ptr.dtype.element_ty))
        else:
            pv = tl.dot(p, ckv, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    po = part_o_ptr + b * stride_po_b + rows[:, None] * stride_po_r + split * stride_po_s + offs_c[None, :]
    tl.store(po, acc, mask=row_ok[:, None] & c_ok[None, :])
    pml = part_ml_ptr + b * stride_pml_b + rows * stride_pml_r + split * stride_pml_s
    tl.store(pml, m_i, mask=row_ok)
    tl.store(pml + 1, l_i, mask=row_ok)


@triton.jit
def mla_decode_combine_kernel(part_o_ptr, part_ml_ptr, o_ptr, S, H, N_SPLITS,
                              stride_po_b, stride_po_r, stride_po_s, stride_pml_b, stride_pml_r, stride_pml_s,
                              stride_o_b, stride_o_s, stride_o_h,
                              C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                              OUT_BF16: tl.constexpr):
    b = tl.program_id(0)
    row = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    s_ok = offs_s < N_SPLITS
    pml = part_ml_ptr + b * stride_pml_b + row * stride_pml_r + offs_s * stride_pml_s
    m = tl.load(pml, mask=s_ok, other=float("-inf"))
    l = tl.load(pml + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))  # empty splits weigh nothing
    denom = tl.sum(l * w, 0)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    po = tl.load(part_o_ptr + b * stride_po_b + row * stride_po_r + offs_s[:, None] * stride_po_s + offs_c[None, :],
                 mask=s_ok[:, None] & c_ok[None, :], other=0.0)
    out = round_for_store(tl.sum(po * w[:, None], 0) / denom, OUT_BF16)
    qi = row // H
    qh = row % H
    tl.store(o_ptr + b * stride_o_b + qi * stride_o_s + qh * stride_o_h + offs_c, out.to(o_ptr.dtype.element_ty), mask=c_ok)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def num_kv_splits(max_tokens: int, max_splits: int, min_split_tokens: int, programs: int = 1,
                  target_programs: int | None = None) -> int:
    """KV splits for a cache of at most max_tokens per sequence and `programs` (sequence, row block) pairs:
    shapes only, so no device read."""
    n = min(max_splits, triton.cdiv(max_tokens, min_split_tokens))
    if target_programs:
        n = min(n, triton.cdiv(target_programs, programs))
    return max(1, n)


def mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale, *, configs=None):
    b, s, h, c = q_latent.shape
    if q_pe.dim() != 4 or q_pe.shape[:3] != (b, s, h) or kv_cache.dim() != 3 or kv_cache.shape[-1] != c \
            or pe_cache.shape[:2] != kv_cache.shape[:2] or pe_cache.shape[-1] != q_pe.shape[-1]:
        raise ContractError(f"mla_decode: q_latent {tuple(q_latent.shape)}, q_pe {tuple(q_pe.shape)}, "
                            f"kv_cache {tuple(kv_cache.shape)}, pe_cache {tuple(pe_cache.shape)} are inconsistent "
                            f"(want q_latent [B,S,H,C], q_pe [B,S,H,R], kv_cache [NB,P,C], pe_cache [NB,P,R])")
    if block_table.dim() != 2 or block_table.shape[0] != b or seq_lens.shape != (b,):
        raise ContractError(f"mla_decode: block_table {tuple(block_table.shape)} / seq_lens {tuple(seq_lens.shape)} "
                            f"must have B={b} rows")
    if block_table.dtype not in (torch.int32, torch.int64) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ContractError(f"mla_decode: block_table and seq_lens must be int32, got {block_table.dtype}, "
                            f"{seq_lens.dtype}")
    for name, t in (("q_latent", q_latent), ("q_pe", q_pe), ("kv_cache", kv_cache), ("pe_cache", pe_cache)):
        if t.stride(-1) != 1:
            raise ContractError(f"mla_decode: {name} needs a contiguous last dim; call .contiguous() first")
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    # seq_lens bounds (S <= L <= max_blocks * P) are the caller's to keep: checking them would read the device.
    if q_latent.dtype not in (torch.float32, torch.bfloat16):
        raise ContractError(f"mla_decode: q_latent must be fp32 or bf16, got {q_latent.dtype}")
    # One config: the split layout and its workspace depend on it, so it is not autotuned per launch.
    constexprs, options = split_config({**DEFAULT_CONFIGS[0], **(configs or DEFAULT_CONFIGS)[0]})
    block_m, block_n = constexprs["BLOCK_M"], constexprs["BLOCK_N"]
    p_size, r = kv_cache.shape[1], q_pe.shape[-1]
    out = torch.empty(b, s, h, c, dtype=q_latent.dtype, device=q_latent.device)
    if b == 0 or s == 0:
        return out
    rows = s * h
    max_tokens = block_table.shape[1] * p_size
    row_blocks = triton.cdiv(rows, block_m)
    n_splits = num_kv_splits(max_tokens, constexprs["MAX_SPLITS"], constexprs["MIN_SPLIT_TOKENS"], b * row_blocks,
                             constexprs["TARGET_PROGRAMS"])
    split_len = triton.cdiv(triton.cdiv(max_tokens, n_splits), block_n) * block_n
    part_o = torch.empty(b, rows, n_splits, c, dtype=torch.float32, device=q_latent.device)
    part_ml = torch.empty(b, rows, n_splits, 2, dtype=torch.float32, device=q_latent.device)
    lowp = q_latent.dtype in (torch.bfloat16, torch.float16) and q_latent.dtype == kv_cache.dtype \
        and not settings.triton_interpret()
    grid = (b, row_blocks, n_splits)
    mla_decode_kernel[grid](
        q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, part_o, part_ml,
        s, h, float(scale), split_len,
        q_latent.stride(0), q_latent.stride(1), q_latent.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1), block_table.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_ml.stride(0), part_ml.stride(1), part_ml.stride(2),
        C=c, R=r, BLOCK_C=_pow2(c), BLOCK_R=_pow2(r), P=p_size, LOWP_DOT=lowp,
        BLOCK_M=block_m, BLOCK_N=block_n, **options)
    mla_decode_combine_kernel[(b, rows)](
        part_o, part_ml, out, s, h, n_splits,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_ml.stride(0), part_ml.stride(1), part_ml.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        C=c, BLOCK_C=_pow2(c), BLOCK_SPLITS=max(2, triton.next_power_of_2(n_splits)),
        OUT_BF16=q_latent.dtype == torch.bfloat16, num_warps=options.get("num_warps", 4))
    return out


def compile_specs(target):
    sig = {"ql_ptr": "*bf16", "qpe_ptr": "*bf16", "kv_ptr": "*bf16", "pe_ptr": "*bf16", "bt_ptr": "*i32",
           "lens_ptr": "*i32", "part_o_ptr": "*fp32", "part_ml_ptr": "*fp32", "S": "i32", "H": "i32", "scale": "fp32",
           "SPLIT_LEN": "i32",
           **{n: "i32" for n in ("stride_ql_b", "stride_ql_s", "stride_ql_h", "stride_qpe_b", "stride_qpe_s",
                                 "stride_qpe_h", "stride_kv_nb", "stride_kv_p", "stride_pe_nb", "stride_pe_p",
                                 "stride_bt_b", "stride_po_b", "stride_po_r", "stride_po_s", "stride_pml_b",
                                 "stride_pml_r", "stride_pml_s")},
           **{c: "constexpr" for c in ("C", "R", "BLOCK_C", "BLOCK_R", "P", "LOWP_DOT", "BLOCK_M", "BLOCK_N")}}
    consts = {"C": 512, "R": 64, "BLOCK_C": 512, "BLOCK_R": 64, "P": 64, "LOWP_DOT": True, "BLOCK_M": 64,
              "BLOCK_N": 32}
    combine_sig = {"part_o_ptr": "*fp32", "part_ml_ptr": "*fp32", "o_ptr": "*bf16", "S": "i32", "H": "i32",
                   "N_SPLITS": "i32",
                   **{n: "i32" for n in ("stride_po_b", "stride_po_r", "stride_po_s", "stride_pml_b", "stride_pml_r",
                                         "stride_pml_s", "stride_o_b", "stride_o_s", "stride_o_h")},
                   **{c: "constexpr" for c in ("C", "BLOCK_C", "BLOCK_SPLITS", "OUT_BF16")}}
    combine_consts = {"C": 512, "BLOCK_C": 512, "BLOCK_SPLITS": 16, "OUT_BF16": True}
    if target.backend == "cuda":  # 64 query rows x 576 against the latent: two warpgroups, wgmma on bf16
        opts, expect = {"num_warps": 8, "num_stages": 2}, (r"wgmma\.mma_async\S*\.f32\.bf16\.bf16",)
    else:
        opts = {"num_warps": 8, "num_stages": 1, "matrix_instr_nonkdim": 16, "kpack": 1}
        expect = (r"v_mfma_f32_\w*bf16",)
    return [CompileSpec("mla_decode[bf16,512+64]", mla_decode_kernel, sig, consts, opts, expect),
            CompileSpec("mla_decode_combine[bf16]", mla_decode_combine_kernel, combine_sig, combine_consts,
                        {"num_warps": 4})]
