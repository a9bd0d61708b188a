"""moe_experts at DeepSeek-V3 expert shapes, bf16 and fp8 (W8A8): the fused kernel vs a per-expert loop and vs the
bf16 dense MLP of the same FLOPs, at decode and prefill token counts.

Rate: TFLOP/s (2 * M * k * 3 * D * I). Per-expert loop: the backend's own linear and silu_mul called expert by
expert (host-side grouping). Dense equivalent: one bf16 SwiGLU MLP of intermediate k * I on the same tokens.
Limit: the roofline of the measured peak (fp8 or bf16) and copy bandwidth over the weights of the experts that
received a token. Error: against cpu_ref's moe_experts on the same inputs and device.
"""
from __future__ import annotations

import torch

from deepport.bench_ops.harness import errors, roofline_ms, tflops, time_ms

UNIT = "TFLOP/s"
V3 = dict(dim=7168, inter=2048, topk=8, experts=256)
DECODE_M, PREFILL_M = (1, 8, 32, 128), (1024, 4096)
SMOKE = dict(dim=256, inter=128, topk=2, experts=4)
SMOKE_M = (1, 9)


def make_experts(n_experts, dim, inter, dtype_name, fmt, device, gen):
    """w1, w2, w3 built expert by expert on the device (fp8: quantised there), so memory stays near the final size."""
    from deepport.core.formats import Fp8Weight, quantize_weight

    ws = []
    for rows_, cols in ((inter, dim), (dim, inter), (inter, dim)):
        if dtype_name == "fp8":
            codes = torch.empty(n_experts, rows_, cols, dtype=fmt.dtype, device=device)
            scales = torch.empty(n_experts, -(-rows_ // 128), -(-cols // 128), dtype=torch.float32, device=device)
            for e in range(n_experts):
                codes[e], scales[e] = quantize_weight(torch.randn(rows_, cols, generator=gen, device=device)
                                                      * cols ** -0.5, fmt)
            ws.append(Fp8Weight(codes, scales))
        else:
            w = torch.empty(n_experts, rows_, cols, dtype=torch.bfloat16, device=device)
            for e in range(n_experts):
                w[e] = torch.randn(rows_, cols, generator=gen, device=device) * cols ** -0.5
            ws.append(w)
    return ws


def _expert(w, e):
    from deepport.core.formats import Fp8Weight

    return Fp8Weight(w.weight[e], w.scale_inv[e], w.block, w.scale_fmt) if isinstance(w, Fp8Weight) else w[e]


def per_expert_loop(table, x, topk_weights, topk_ids, per_expert):
    """The unfused baseline: group pairs by expert on the host, then linear/silu_mul/linear per active expert."""
    m, k = topk_ids.shape
    flat = topk_ids.flatten()
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=len(per_expert)).tolist()  # the host sync the fused kernel avoids
    tw = topk_weights.flatten().float()
    y = torch.zeros(m, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        pairs = order[start:start + n]
        start += n
        tok = pairs // k
        xe = x[tok]
        w1, w2, w3 = per_expert[e]
        h = table.silu_mul(torch.cat((table.linear(xe, w1), table.linear(xe, w3)), dim=-1))
        y.index_add_(0, tok, table.linear(h, w2).float() * tw[pairs, None])
    return y.to(x.dtype)


def rows(table, limits: dict, smoke: bool, gen: torch.Generator, dtypes=("fp8", "bf16")):
    from deepport.backends.cpu_ref import ops as ref

    dims = SMOKE if smoke else V3
    dev, d, i, k, n_exp = table.device, dims["dim"], dims["inter"], dims["topk"], dims["experts"]
    token_counts = SMOKE_M if smoke else DECODE_M + PREFILL_M
    # the dense bf16 MLP with the FLOPs of k experts per token
    dense = [(torch.randn(rows_, cols, generator=gen, device=dev) * cols ** -0.5).to(torch.bfloat16)
             for rows_, cols in ((k * i, d), (d, k * i), (k * i, d))]

    def dense_mlp(x):
        return torch.nn.functional.linear(
            torch.nn.functional.silu(x @ dense[0].T) * (x @ dense[2].T), dense[1])

    for dtype_name in dtypes:
        ws = make_experts(n_exp, d, i, dtype_name, table.fp8, dev, gen)
        per_expert = [tuple(_expert(w, e) for w in ws) for e in range(n_exp)]
        for m in token_counts:
            x = torch.randn(m, d, generator=gen, device=dev).to(torch.bfloat16)
            ids = torch.stack([torch.randperm(n_exp, generator=gen, device=dev)[:k] for _ in range(m)])
            weights = torch.rand(m, k, generator=gen, device=dev)
            got = table.moe_experts(x, weights, ids, *ws)
            with torch.no_grad():
                want = ref.moe_experts(x, weights, ids, *ws)
            active = int(torch.unique(ids).numel())
            flops = 2 * m * k * 3 * d * i
            wbytes = active * 3 * d * i * (1 if dtype_name == "fp8" else 2)
            row = {"case": f"{dtype_name} M={m}", "shape": {"dtype": dtype_name, "M": m, "experts": n_exp, "topk": k,
                                                          "D": d, "I": i, "active_experts": active,
                                                          "phase": "decode" if m <= 128 else "prefill"},
                   **errors(got, want)}
            del got, want
            ms, timer = time_ms(lambda: table.moe_experts(x, weights, ids, *ws), dev, smoke)
            row["kernel"] = {"ms": ms, "rate": tflops(flops, ms), "timer": timer,
                             "weight_gbs": None if not ms else wbytes / (ms * 1e-3) / 1e9}
            loop_ms, loop_timer = time_ms(lambda: per_expert_loop(table, x, weights, ids, per_expert), dev, smoke,
                                          graph=False)
            dense_ms, dense_timer = time_ms(lambda: dense_mlp(x), dev, smoke)
            row["baselines"] = {"per_expert_loop": {"ms": loop_ms, "rate": tflops(flops, loop_ms), "timer": loop_timer},
                                "bf16_dense_equivalent": {"ms": dense_ms, "rate": tflops(flops, dense_ms),
                                                          "timer": dense_timer}}
            peak = limits.get("fp8_tflops") if dtype_name == "fp8" else limits.get("bf16_tflops")
            lim_ms = roofline_ms(flops, wbytes + 4 * m * d, peak or limits.get("bf16_tflops"), limits["copy_gbs"])
            row["limit"] = {"rate": tflops(flops, lim_ms), "what": f"roofline: {dtype_name} peak, copy bw over "
                                                                  f"the active experts' weights"}
            yield row
        del ws, per_expert


def anchors(rows_: list[dict]) -> list[dict]:
    """Issue target: >= 2x the per-expert loop at decode token counts."""
    dec = [r for r in rows_ if r["shape"]["phase"] == "decode" and r["kernel"]["ms"]
           and r["baselines"]["per_expert_loop"]["ms"]]
    sp = [r["baselines"]["per_expert_loop"]["ms"] / r["kernel"]["ms"] for r in dec]
    return [{"name": "moe_experts speed-up vs the per-expert loop at decode token counts (worst)", "target": 2.0,
             "value": min(sp) if sp else None, "note": None if sp else "no timed decode row"}]
