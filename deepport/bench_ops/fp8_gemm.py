"""fp8_gemm at DeepSeek-V3's linear shapes: the backend's kernel vs blockwise torch._scaled_mm (sm90) and bf16 matmul.

Rate: TFLOP/s (2*M*N*K). Limit: the roofline of the measured fp8 peak (tensorwise _scaled_mm at 8192^3) and
the measured copy bandwidth over the bytes one GEMM must move (A, B, scales, C). Error: against cpu_ref's fp8_gemm
on the same codes and device.
"""
from __future__ import annotations

import torch

from deepport.bench_ops.harness import errors, roofline_ms, tflops, time_ms

UNIT = "TFLOP/s"
# (name, N, K) of DeepSeek-V3's fp8 linears (dim 7168, q_lora 1536, kv_lora 512 + rope 64, 128 heads)
SHAPES = [("wq_a", 1536, 7168), ("wq_b", 24576, 1536), ("wkv_a", 576, 7168), ("wkv_b", 32768, 512),
          ("wo", 7168, 16384), ("dense_w1", 18432, 7168), ("dense_w2", 7168, 18432),
          ("expert_w1", 2048, 7168), ("expert_w2", 7168, 2048)]
M_VALUES = (1, 64, 512, 1024, 4096)
SMOKE_SHAPES = [("smoke_ragged_n", 200, 256)]
SMOKE_M = (1, 33)


def scaled_mm_blockwise(a, a_scale, b, b_scale, out_dtype=torch.bfloat16):
    """DeepSeek's recipe through torch._scaled_mm (sm90, cuBLASLt >= 12.9 only): A 1x128, B 128x128 scales."""
    kb = a_scale.shape[1]
    kb_pad = -(-kb // 4) * 4
    scale_a = a_scale.t().contiguous().t()  # [M, K/128], M-major
    scale_b = torch.zeros(b_scale.shape[0], kb_pad, dtype=torch.float32, device=b_scale.device)
    scale_b[:, :kb] = b_scale
    return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b.t(), out_dtype=out_dtype)


def blockwise_scaled_mm_reason(device: torch.device) -> str | None:
    """Why blockwise _scaled_mm is not measured here, or None where it may run (sm90)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"blockwise torch._scaled_mm needs an sm90 GPU; this run is on {device.type}"
    if torch.version.hip:
        return "blockwise torch._scaled_mm is a cuBLASLt (sm90) path; this is ROCm"
    cc = torch.cuda.get_device_capability(device)
    if cc != (9, 0):
        return f"blockwise torch._scaled_mm runs only on sm90 (cuBLASLt >= 12.9); this GPU is sm{cc[0]}{cc[1]}"
    return None


def rows(table, limits: dict, smoke: bool, gen: torch.Generator):
    from deepport.backends.cpu_ref import ops as ref
    from deepport.core.formats import quantize_weight

    dev, fmt = table.device, table.fp8
    skip_sm = blockwise_scaled_mm_reason(dev)
    for name, n, k in (SMOKE_SHAPES if smoke else SHAPES):
        w = 0.02 * torch.randn(n, k, generator=gen, device=dev)
        codes_b, scale_b = quantize_weight(w, fmt)
        w_bf16 = w.to(torch.bfloat16)
        del w
        for m in (SMOKE_M if smoke else M_VALUES):
            x = torch.randn(m, k, generator=gen, device=dev).to(torch.bfloat16)
            codes_a, scale_a = table.act_quant(x, fmt)
            got = table.fp8_gemm(codes_a, scale_a, codes_b, scale_b)
            want = ref.fp8_gemm(codes_a, scale_a, codes_b, scale_b)
            flops = 2 * m * n * k
            nbytes = m * k + n * k + 4 * (scale_a.numel() + scale_b.numel()) + 2 * m * n
            row = {"case": f"{name} M={m}", "shape": {"name": name, "M": m, "N": n, "K": k}, **errors(got, want)}
            ms, timer = time_ms(lambda: table.fp8_gemm(codes_a, scale_a, codes_b, scale_b), dev, smoke)
            row["kernel"] = {"ms": ms, "rate": tflops(flops, ms), "timer": timer}
            ms, timer = time_ms(lambda: x @ w_bf16.T, dev, smoke)
            bl = {"bf16_matmul": {"ms": ms, "rate": tflops(flops, ms), "timer": timer}}
            if skip_sm:
                bl["scaled_mm_blockwise"] = {"ms": None, "rate": None, "skipped": skip_sm}
            else:
                try:
                    sm = scaled_mm_blockwise(codes_a, scale_a, codes_b, scale_b)
                    err = errors(sm, want)
                    if err["max_rel_err"] > 2e-2:
                        raise RuntimeError(f"wrong result (max rel err {err['max_rel_err']:.2e}): "
                                           f"scale layout not accepted as DeepSeek's")
                    ms, timer = time_ms(lambda: scaled_mm_blockwise(codes_a, scale_a, codes_b, scale_b), dev, smoke)
                    bl["scaled_mm_blockwise"] = {"ms": ms, "rate": tflops(flops, ms), "timer": timer, **err}
                except Exception as e:  # old cuBLASLt: recorded, not fatal
                    bl["scaled_mm_blockwise"] = {"ms": None, "rate": None,
                                                 "skipped": f"{type(e).__name__}: {str(e)[:200]}"}
            row["baselines"] = bl
            peak = limits.get("fp8_tflops") or limits.get("bf16_tflops")
            lim_ms = roofline_ms(flops, nbytes, peak, limits["copy_gbs"])
            row["limit"] = {"rate": tflops(flops, lim_ms),
                            "what": "roofline: " + ("fp8" if limits.get("fp8_tflops") else "bf16") + " peak, copy bw"}
            yield row


def anchors(rows_: list[dict]) -> list[dict]:
    """Issue targets: >= 0.8x blockwise _scaled_mm and >= 1.5x bf16 matmul at M >= 512."""
    big = [r for r in rows_ if r["shape"]["M"] >= 512 and r["kernel"]["ms"]]
    out = []
    for base, target in (("scaled_mm_blockwise", 0.8), ("bf16_matmul", 1.5)):
        ratios = [r["baselines"][base]["ms"] / r["kernel"]["ms"] for r in big if r["baselines"][base].get("ms")]
        out.append({"name": f"fp8_gemm vs {base} at M>=512 (worst shape)", "target": target,
                    "value": min(ratios) if ratios else None,
                    "note": None if ratios else "no timed row (baseline skipped or no M>=512 row)"})
    return out
