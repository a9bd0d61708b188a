"""Paged latent KV cache: per layer a pool of blocks holding kv_norm(c_kv) [C] and rotated k_pe [R] per token."""
from __future__ import annotations

import torch

from deepport.core.errors import DeepportError


class PagedLatentCache:
    """Block pools shared by a batch of sequences; each sequence owns blocks listed in its block_table row.

    kv[layer]: [NB, P, C]; pe[layer]: [NB, P, R]; block_table: [B, max_blocks] int32; seq_lens: [B] int32
    (device tensors, updated in place: a captured decode step reads them), mirrored by `lens` (host ints) so
    the generation loop never synchronises. The pool's last block is scratch: every block-table entry not
    yet allocated points there, so a padding row (a batch bucket's spare row, length 0) writes and reads
    only scratch.
    """

    def __init__(self, n_layers: int, batch: int, max_tokens: int, kv_dim: int, pe_dim: int,
                 dtype: torch.dtype, device, block_size: int = 16, rows_held: int | None = None):
        """rows_held: how many of the batch's rows get pool space here (all by default; fewer when each
        rank of data-parallel attention caches only its own sequences)."""
        self.block_size = block_size
        self.max_blocks = -(-max_tokens // block_size)
        n_blocks = (batch if rows_held is None else rows_held) * self.max_blocks
        self.scratch = n_blocks
        n_blocks += 1
        self.kv = [torch.zeros(n_blocks, block_size, kv_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pe = [torch.zeros(n_blocks, block_size, pe_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self._flat = [(k.view(-1, kv_dim), p.view(-1, pe_dim)) for k, p in zip(self.kv, self.pe)]  # slot-major views
        self.block_table = torch.full((batch, self.max_blocks), self.scratch, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.lens = [0] * batch
        self._owned: list[list[int]] = [[] for _ in range(batch)]
        # Hand blocks out in reverse so a sequence's blocks are not contiguous: exercises the paging.
        self._free = list(range(self.scratch))
        self._index: dict[tuple, torch.Tensor] = {}

    @property
    def batch(self) -> int:
        return len(self.lens)

    def reserve(self, rows: list[int], n_new: int) -> None:
        """Make room for n_new more tokens in each row (allocating blocks)."""
        for r in rows:
            need = -(-(self.lens[r] + n_new) // self.block_size)
            if need > self.max_blocks:
                raise DeepportError(f"sequence {r} would hold {self.lens[r] + n_new} tokens, more than the cache's "
                                    f"{self.max_blocks * self.block_size}; raise max_tokens (or --max-new-tokens less)")
            while len(self._owned[r]) < need:
                blk = self._free.pop()
                self.block_table[r, len(self._owned[r])] = blk
                self._owned[r].append(blk)

    def slots(self, rows: list[int], n_new: int) -> torch.Tensor:
        """Flat slot index (block * P + offset) of the next n_new positions of each row: [len(rows), n_new] int64,
        from the host mirror (reserve first)."""
        p = self.block_size
        out = [[self._owned[r][j // p] * p + j % p for j in range(self.lens[r], self.lens[r] + n_new)] for r in rows]
        return torch.tensor(out, dtype=torch.long, device=self.block_table.device)

    def write(self, layer: int, slots: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Store kv [b, s, C] and pe [b, s, R] at the given slots [b, s]."""
        flat = slots.flatten()
        if torch.compiler.is_compiling():  # views made in the graph: inputs that alias a mutated input cost a
            kv_pool = self.kv[layer].view(-1, self.kv[layer].shape[-1])  # "synthetic base" rebuilt every call
            pe_pool = self.pe[layer].view(-1, self.pe[layer].shape[-1])
        else:
            kv_pool, pe_pool = self._flat[layer]
        kv, pe = kv.reshape(-1, kv.shape[-1]), pe.reshape(-1, pe.shape[-1])
        kv_pool.index_copy_(0, flat, kv if kv.dtype == kv_pool.dtype else kv.to(kv_pool.dtype))  # whole rows
        pe_pool.index_copy_(0, flat, pe if pe.dtype == pe_pool.dtype else pe.to(pe_pool.dtype))

    def index(self, rows: list[int]):
        """`rows` as an index into the device tensors: a slice when contiguous, else a device tensor made once."""
        rows = tuple(rows)
        if rows and rows == tuple(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        if rows not in self._index:
            self._index[rows] = torch.tensor(rows, dtype=torch.long, device=self.seq_lens.device)
        return self._index[rows]

    def advance(self, rows: list[int], n_new: int) -> None:
        """n_new tokens were written for each row: host lengths and device seq_lens (in place, no host sync)."""
        for r in rows:
            self.lens[r] += n_new
        if rows:
            idx = self.index(rows)
            if isinstance(idx, slice):  # a view: one in-place add (`+=` on an index also writes the view back)
                self.seq_lens[idx].add_(n_new)
            else:
                self.seq_lens[idx] += n_new

    def reset(self) -> None:
        """Empty every sequence (blocks back to the pool), keeping the tensors: a captured step stays valid."""
        for r in range(self.batch):
            self.truncate(r, 0)
        self.block_table.fill_(self.scratch)

    def truncate(self, row: int, length: int) -> None:
        """Roll a sequence back to `length` tokens (speculative decoding's rejected drafts); frees spare blocks."""
        if length > self.lens[row]:
            raise DeepportError(f"cannot truncate sequence {row} from {self.lens[row]} up to {length} tokens")
        self.lens[row] = length
        self.seq_lens[row] = length
        keep = -(-length // self.block_size)
        while len(self._owned[row]) > keep:
            self._free.append(self._owned[row].pop())

    def contents(self, layer: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid (kv, pe) rows of one sequence in one layer, in token order (for tests and debugging)."""
        n = self.lens[row]
        blocks = torch.tensor(self._owned[row], dtype=torch.long)
        kv = self.kv[layer][blocks].flatten(0, 1)[:n]
        pe = self.pe[layer][blocks].flatten(0, 1)[:n]
        return kv, pe
