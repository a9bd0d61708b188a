"""moe_align: sort (token, expert) pairs by expert and pad each expert's run to BLOCK_M rows, on the device.

Everything is sized by upper bounds known from shapes (pairs P = M * k, experts E), so nothing is read
back to the host: no .item(), no .tolist(), no data-dependent output shapes. Pair p is (token p // k,
slot p % k) of topk_ids [M, k]. Pairs with an id outside [0, E) (ids < 0: experts on another rank)
are dropped.
"""
from __future__ import annotations

import torch


def max_blocks(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Upper bound on padded blocks: every expert that receives a pair adds at most one partial block."""
    return -(-n_pairs // block_m) + min(n_experts, n_pairs)


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int):
    """Returns (sorted_pairs [n_blocks * block_m] int32, block_expert [n_blocks] int32).

    sorted_pairs lists each expert's pairs in token order, padded to a multiple of block_m with the
    sentinel P (= number of pairs); block_expert[i] is the expert of rows i*block_m..(i+1)*block_m-1, or -1
    for blocks past the last expert (the grid's upper bound).
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1)
    n_pairs = flat.numel()
    n_blocks = max_blocks(n_pairs, n_experts, block_m)
    dropped = (flat < 0) | (flat >= n_experts)
    bucket = torch.where(dropped, torch.full_like(flat, n_experts), flat)  # bucket E collects dropped pairs
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    order = torch.argsort(bucket, stable=True)  # pairs grouped by expert, token order kept inside a group
    sorted_bucket = bucket[order]
    start = torch.cumsum(counts, 0) - counts  # first sorted position of each bucket
    padded = (counts[:n_experts] + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    rank = torch.arange(n_pairs, device=device) - start[sorted_bucket]
    dump = n_blocks * block_m  # dropped pairs land in one extra slot, cut off below
    dest = torch.where(sorted_bucket < n_experts, pad_start[sorted_bucket.clamp(max=n_experts - 1)] + rank,
                       torch.full_like(rank, dump))
    sorted_pairs = torch.full((dump + 1,), n_pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(n_blocks, device=device) * block_m
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, torch.full_like(block_expert, -1))
    return sorted_pairs[:dump], block_expert.to(torch.int32)
