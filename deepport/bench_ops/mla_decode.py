"""mla_decode at DeepSeek-V3 shapes: GB/s of the paged latent-cache read vs the device's measured copy bandwidth.

Bytes: each sequence's cached latent + rope rows (576 x 2 bytes per token in bf16), the queries and the output.
Baseline: cpu_ref's torch code (gather + einsum) on the same device. Limit: the measured copy bandwidth.
Error: against cpu_ref's mla_decode on the same inputs and device.
"""
from __future__ import annotations

import torch

from deepport.bench_ops.harness import errors, gbs, time_ms

UNIT = "GB/s"
V3 = dict(heads=128, kv_lora_rank=512, rope=64, page=64)
BATCHES = (1, 8, 32, 64, 128)
CONTEXTS = (1024, 4096, 16384, 32768)
SMOKE = dict(heads=4, kv_lora_rank=64, rope=16, page=16)
SMOKE_BATCHES, SMOKE_CONTEXTS = (2,), (40,)


def rows(table, limits: dict, smoke: bool, gen: torch.Generator, s: int = 1):
    from deepport.backends.cpu_ref import ops as ref

    dims = SMOKE if smoke else V3
    dev, h, c, r, page = table.device, dims["heads"], dims["kv_lora_rank"], dims["rope"], dims["page"]
    for batch in (SMOKE_BATCHES if smoke else BATCHES):
        for ctx in (SMOKE_CONTEXTS if smoke else CONTEXTS):
            lens = [max(s, ctx - 7 * i) for i in range(batch)]  # slightly different lengths, none a page multiple
            max_blocks = -(-max(lens) // page)
            n_blocks = batch * max_blocks
            q_latent = torch.randn(batch, s, h, c, generator=gen, device=dev).to(torch.bfloat16)
            q_pe = torch.randn(batch, s, h, r, generator=gen, device=dev).to(torch.bfloat16)
            kv_cache = torch.randn(n_blocks, page, c, generator=gen, device=dev).to(torch.bfloat16)
            pe_cache = torch.randn(n_blocks, page, r, generator=gen, device=dev).to(torch.bfloat16)
            block_table = torch.randperm(n_blocks, generator=gen, device=dev).view(batch, max_blocks).to(torch.int32)
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            args = (q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, (128 + 64) ** -0.5)
            got = table.mla_decode(*args)
            want = ref.mla_decode(*args)
            nbytes = sum(lens) * (c + r) * 2 + 2 * q_latent.numel() * 2 + q_pe.numel() * 2
            row = {"case": f"batch={batch} ctx={ctx}", "shape": {"batch": batch, "ctx": ctx, "S": s, "heads": h},
                   **errors(got, want)}
            del got, want
            ms, timer = time_ms(lambda: table.mla_decode(*args), dev, smoke)
            row["kernel"] = {"ms": ms, "rate": gbs(nbytes, ms), "timer": timer}
            ms, timer = time_ms(lambda: ref.mla_decode(*args), dev, smoke, graph=False)
            row["baselines"] = {"cpu_ref_torch": {"ms": ms, "rate": gbs(nbytes, ms), "timer": timer}}
            row["limit"] = {"rate": limits["copy_gbs"], "what": "measured copy bandwidth"}
            del q_latent, q_pe, kv_cache, pe_cache, block_table, args
            yield row


def anchors(rows_: list[dict]) -> list[dict]:
    """Issue target: >= 70% of the measured copy bandwidth at batch >= 32, context >= 4k."""
    big = [r for r in rows_ if r["shape"]["batch"] >= 32 and r["shape"]["ctx"] >= 4096 and r["kernel"]["rate"]]
    fr = [r["kernel"]["rate"] / r["limit"]["rate"] for r in big]
    return [{"name": "mla_decode fraction of copy bandwidth at batch>=32, ctx>=4k (worst)", "target": 0.7,
             "value": min(fr) if fr else None, "note": None if fr else "no timed row at batch>=32, ctx>=4k"}]
