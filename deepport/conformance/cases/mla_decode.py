"""mla_decode cases: absorbed MLA over a shuffled paged latent cache, ragged lengths, S>1 (MTP) queries."""
import torch

from deepport.conformance.case import case, randn, v3_args


def _build(seq_lens, s, h, page, spare_blocks):
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
        return {"q_latent": randn(g, b, s, h, c, std=c ** -0.25), "q_pe": randn(g, b, s, h, r, std=c ** -0.25),
                "kv_cache": randn(g, nb, page, c), "pe_cache": randn(g, nb, page, r),
                "block_table": table.to(torch.int32), "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
                "scale": a.softmax_scale}
    return build


def cases(tier):
    shapes = {"quick": [("ragged", [5, 17, 33], 1, 4, 16, 1), ("mtp", [3, 20], 2, 4, 16, 2),
                        ("chunk", [6, 9], 4, 2, 4, 1)],
              "full": [("ragged", [1000, 37, 513, 2048], 1, 128, 64, 1), ("mtp", [130, 700], 2, 128, 64, 2)]}[tier]
    note = "C=512, R=64; scale = v3-671b softmax_scale (with YaRN mscale), never 576^-0.5"
    return [case("mla_decode", v, "bf16", tier, _build(lens, s, h, p, spare),
                 note=f"{note}; seq_lens {lens}, S={s}, P={p}")
            for v, lens, s, h, p, spare in shapes]
