"""mla_decode cases: absorbed MLA over a shuffled paged latent cache, ragged lengths, S>1 (MTP) queries;
contexts long enough that any split-KV kernel splits them (quick tier too); large scaled scores; bf16 and fp32."""
import torch

from deepport.conformance.case import case, randn, v3_args
from deepport.conformance.cases.mla_prefill import BIAS_DIM, SCORE_MAX, SHIFTS, SPREAD


def _build(seq_lens, s, h, page, spare_blocks, large=False, dtype=torch.bfloat16):
    def build(g, fmt):
        a = v3_args()
        c, r, b = a.kv_lora_rank, a.qk_rope_head_dim, len(seq_lens)
        need = [-(-n // page) for n in seq_lens]
        max_blocks = max(need) + spare_blocks
        nb = sum(need) + 2
        order = torch.randperm(nb, generator=g)  # blocks scattered through the pool
        # unused entries point at real blocks of other sequences: reading them changes the result
        table = torch.randint(0, nb, (b, max_blocks), generator=g)
        used = 0
        for i, n in enumerate(need):
            table[i, :n] = order[used:used + n]
            used += n
        f32 = torch.float32
        q_latent, q_pe = randn(g, b, s, h, c, std=c ** -0.25, dtype=f32), randn(g, b, s, h, r, std=c ** -0.25, dtype=f32)
        kv, pe = randn(g, nb, page, c, dtype=f32), randn(g, nb, page, r, dtype=f32)
        if large:  # scaled scores = shift(row) + N(0, SPREAD^2): V is the latent, so dim 0 is a constant column of V
            # q rows of std SPREAD / (scale * sqrt(C + R)) against unit-normal cache rows: scaled std SPREAD
            q_latent = q_latent * (SPREAD * c ** 0.25 / (a.softmax_scale * (c + r) ** 0.5))
            q_pe = q_pe * (SPREAD * c ** 0.25 / (a.softmax_scale * (c + r) ** 0.5))
            kv[..., 0] = BIAS_DIM
            rows = s * h
            shift = torch.tensor(SHIFTS).repeat(b * rows)[:b * rows].view(b, s, h)
            q_latent[..., 0] = shift / (a.softmax_scale * BIAS_DIM)
        return {"q_latent": q_latent.to(dtype), "q_pe": q_pe.to(dtype), "kv_cache": kv.to(dtype),
                "pe_cache": pe.to(dtype), "block_table": table.to(torch.int32),
                "seq_lens": torch.tensor(seq_lens, dtype=torch.int32), "scale": a.softmax_scale}
    return build


def cases(tier):
    f32 = torch.float32
    # "splits": every KV split scheme in the tree splits these (Triton: min(16, ceil(max_tokens / 256)) splits for
    # a small batch; FlashMLA-style schedulers split past a few hundred tokens), so the log-sum-exp merge of split
    # partials is judged in the quick tier; lengths are not multiples of a split, and one row is a single token
    shapes = {"quick": [("ragged", [5, 17, 33], 1, 4, 16, 1, False, None), ("mtp", [3, 20], 2, 4, 16, 2, False, None),
                        ("chunk", [6, 9], 4, 2, 4, 1, False, None),
                        ("splits", [1100, 2100, 300, 1], 1, 4, 64, 1, False, None),
                        ("splits_mtp", [1500, 777], 3, 2, 32, 2, False, None),
                        ("large_scores", [1300, 520], 2, 4, 64, 1, True, None),
                        ("large_scores_fp32in", [900, 1700], 1, 2, 64, 1, True, f32),
                        ("mtp_fp32in", [3, 20], 2, 4, 16, 2, False, f32),
                        ("single", [37], 1, 4, 16, 1, False, None), ("equal_mtp", [21, 21], 2, 4, 16, 1, False, None)],
              "full": [("ragged", [1000, 37, 513, 2048], 1, 128, 64, 1, False, None),
                       ("mtp", [130, 700], 2, 128, 64, 2, False, None),
                       ("splits", [8192, 3001], 1, 128, 64, 1, False, None),
                       ("large_scores", [4096, 1025], 2, 128, 64, 1, True, None),
                       ("large_scores_fp32in", [2049, 4000], 1, 16, 64, 1, True, f32),
                       ("mtp_fp32in", [130, 700], 2, 16, 64, 2, False, f32),  # fp32 served MTP verification
                       # batch-1 decode, and a batch whose rows hold equal lengths (no padding to mask)
                       ("single", [3000], 1, 128, 64, 1, False, None),
                       ("equal_mtp", [700, 700], 2, 128, 64, 1, False, None)]}[tier]
    note = "C=512, R=64; scale = v3-671b softmax_scale (with YaRN mscale), never 576^-0.5"
    big = "; scaled scores ~+80..+100 and ~-150..-110 by row"
    return [case("mla_decode", v, "bf16", tier, _build(lens, s, h, p, spare, large, dt or torch.bfloat16),
                 note=f"{note}; seq_lens {lens}, S={s}, P={p}" + (big if large else ""), out_dtype="fp32" if dt else "",
                 magnitude=SCORE_MAX if large else 0.0)
            for v, lens, s, h, p, spare, large, dt in shapes]
