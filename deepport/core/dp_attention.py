"""Data-parallel attention for expert-parallel runs: each rank attends for, and caches, only its sequences.

At tp=1 every EP rank holds all attention weights; without this every rank would run MLA for every
sequence and cache all of them. Here sequence (cache row) r belongs to rank r % ep: the rank runs MLA
for its rows only, keeps their latents in a cache sized for its rows, and one all_reduce of the
zero-padded [B, S, D] output (one rank holds each row, so the sum is exact) hands every rank the full
residual stream; the MoE layers stay expert-parallel. The control flow is the same on every rank, so
ranks never fall out of step (a rank without rows in a step adds zeros).
"""
from __future__ import annotations

import dataclasses

import torch

from deepport.core.cache import PagedLatentCache
from deepport.core.distributed import Layout, World
from deepport.core.errors import ConfigError, DeepportError
from deepport.core.model import Transformer


class RowShardedCache(PagedLatentCache):
    """A paged latent cache whose block pools hold only the rows with row % n == rank (block tables for all)."""

    def __init__(self, n_layers: int, batch: int, max_tokens: int, kv_dim: int, pe_dim: int, dtype, device,
                 block_size: int, rank: int, n: int):
        self.rank, self.n = rank, n
        super().__init__(n_layers, batch, max_tokens, kv_dim, pe_dim, dtype, device, block_size,
                         rows_held=sum(self.holds(r) for r in range(batch)))

    def holds(self, row: int) -> bool:
        return row % self.n == self.rank

    def reserve(self, rows: list[int], n_new: int) -> None:
        for r in rows:  # every rank checks every row, so all refuse together
            if -(-(self.lens[r] + n_new) // self.block_size) > self.max_blocks:
                raise DeepportError(f"sequence {r} would hold {self.lens[r] + n_new} tokens, more than the cache's "
                                    f"{self.max_blocks * self.block_size}; raise max_tokens (or --max-new-tokens less)")
        super().reserve([r for r in rows if self.holds(r)], n_new)

    def slots(self, rows: list[int], n_new: int) -> torch.Tensor:
        """Slots of this rank's rows; other ranks' rows get 0 (never written here: see attend_own_rows)."""
        out = torch.zeros(len(rows), n_new, dtype=torch.long, device=self.block_table.device)
        mine = [i for i, r in enumerate(rows) if self.holds(r)]
        if mine:
            out[mine] = super().slots([rows[i] for i in mine], n_new)
        return out


def _own_rows_forward(inner, ops, world: World, n: int, rank: int):
    def forward(x, ctx):
        rows = ctx.rows if ctx.rows is not None else list(range(x.shape[0]))
        mine = [i for i, r in enumerate(rows) if r % n == rank]
        out = torch.zeros_like(x)  # [B, S, D]
        if mine:
            idx = torch.tensor(mine, device=x.device)
            pick = (lambda t: None if t is None else t[idx])
            sub = dataclasses.replace(ctx, cos=ctx.cos[idx], sin=ctx.sin[idx], slots=pick(ctx.slots),
                                      block_table=pick(ctx.block_table), seq_lens=pick(ctx.seq_lens),
                                      rows=None if ctx.rows is None else [rows[i] for i in mine])
            out[idx] = inner(x[idx], sub)
        return ops.all_reduce(out, world.group)

    return forward


def check(layout: Layout | None) -> None:
    """ConfigError unless the run is expert-parallel without TP (checked before any collective)."""
    tp, ep = (layout.tp, layout.ep) if layout is not None else (1, 1)
    if tp != 1 or ep < 2:
        raise ConfigError(f"data-parallel attention spreads sequences over expert-parallel ranks: it needs "
                          f"--tp 1 and --ep >= 2 (got --tp {tp} --ep {ep}); TP already splits attention heads")


def apply(model: Transformer, world: World) -> None:
    """Make every MLA layer (main and MTP) attend for this rank's rows only, and caches hold only those rows."""
    check(world.layout)
    n, rank = world.layout.ep, world.layout.ep_rank
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        attn = block.attn
        attn.forward = _own_rows_forward(attn.forward, model.ops, world, n, rank)
    a = model.args

    def new_cache(batch: int, max_tokens: int, block_size: int = 16, mtp: bool = False) -> RowShardedCache:
        layers = a.n_mtp_layers if mtp else a.n_layers
        return RowShardedCache(layers, batch, max_tokens, a.kv_lora_rank, a.qk_rope_head_dim, model.dtype,
                               model.embed.weight.device, block_size, rank, n)

    model.new_cache = new_cache
