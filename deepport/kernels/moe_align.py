"""moe_align: sort (token, expert) pairs by expert and pad each expert's run to BLOCK_M rows, on the device.

Everything is sized by upper bounds known from shapes (pairs P = M * k, experts E), so nothing is read
back to the host: no .item(), no .tolist(), no data-dependent output shapes. Pair p is (token p // k,
slot p % k) of topk_ids [M, k]. Pairs with an id outside [0, E) (ids < 0: experts on another rank)
are dropped. Up to MAX_PAIRS pairs (decode and small prefills) one Triton program does it all in a
single launch (`moe_align_kernel`); larger batches use the same algorithm in torch ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PAIRS = 4096  # one program sorts up to this many pairs (a bitonic sort in one CTA)


@triton.jit
def moe_align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, shift_ptr, N_PAIRS, N_EXPERTS, N_BLOCKS,
                     BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    ids = tl.load(ids_ptr + offs, mask=offs < N_PAIRS, other=-1).to(tl.int32)
    bucket = tl.where((ids < 0) | (ids >= N_EXPERTS), N_EXPERTS, ids)  # bucket E: dropped pairs and padding
    counts = tl.histogram(bucket, BLOCK_E)
    # sort by (expert, pair): pairs grouped by expert, token order kept inside a group
    key = tl.sort(bucket * BLOCK_P + offs)
    s_bucket = key // BLOCK_P
    s_pair = key % BLOCK_P
    e_offs = tl.arange(0, BLOCK_E)
    is_expert = e_offs < N_EXPERTS
    padded = tl.where(is_expert, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    pad_end = tl.cumsum(padded, 0)
    start = tl.cumsum(counts, 0) - counts
    # sorted position i of an expert-e pair goes to pad_start[e] + (i - start[e]): gather the shift via memory
    tl.store(shift_ptr + e_offs, pad_end - padded - start)
    for b0 in range(0, N_BLOCKS * BLOCK_M, BLOCK_P):  # every row starts as padding (sentinel P)
        rows = b0 + offs
        tl.store(sorted_ptr + rows, tl.full([BLOCK_P], 0, tl.int32) + N_PAIRS, mask=rows < N_BLOCKS * BLOCK_M)
    tl.debug_barrier()
    shift = tl.load(shift_ptr + s_bucket)
    tl.store(sorted_ptr + offs + shift, s_pair, mask=s_bucket < N_EXPERTS)
    # block b belongs to the first expert whose padded run ends after b * BLOCK_M
    for b0 in range(0, N_BLOCKS, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        before = (pad_end[None, :] <= blocks[:, None] * BLOCK_M) & is_expert[None, :]
        expert = tl.sum(before.to(tl.int32), 1)
        tl.store(block_expert_ptr + blocks, tl.where(expert < N_EXPERTS, expert, -1), mask=blocks < N_BLOCKS)


def max_blocks(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Upper bound on padded blocks: every expert that receives a pair adds at most one partial block."""
    return -(-n_pairs // block_m) + min(n_experts, n_pairs)


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int, max_pairs: int = MAX_PAIRS):
    """Returns (sorted_pairs [n_blocks * block_m] int32, block_expert [n_blocks] int32).

    sorted_pairs lists each expert's pairs in token order, padded to a multiple of block_m with the
    sentinel P (= number of pairs); block_expert[i] is the expert of rows i*block_m..(i+1)*block_m-1, or -1
    for blocks past the last expert (the grid's upper bound).
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1)
    n_pairs = flat.numel()
    n_blocks = max_blocks(n_pairs, n_experts, block_m)
    if 0 < n_pairs <= max_pairs:
        sorted_pairs = torch.empty(n_blocks * block_m, dtype=torch.int32, device=device)
        block_expert = torch.empty(n_blocks, dtype=torch.int32, device=device)
        shift = torch.empty(triton.next_power_of_2(n_experts + 1), dtype=torch.int32, device=device)
        moe_align_kernel[(1,)](flat.contiguous(), sorted_pairs, block_expert, shift, n_pairs, n_experts, n_blocks,
                               BLOCK_P=max(16, triton.next_power_of_2(n_pairs)), BLOCK_E=shift.shape[0],
                               BLOCK_B=64, BLOCK_M=block_m, num_warps=4)
        return sorted_pairs, block_expert
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


def compile_specs(target):
    from deepport.kernels.targets import CompileSpec

    sig = {"ids_ptr": "*i64", "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "shift_ptr": "*i32",
           "N_PAIRS": "i32", "N_EXPERTS": "i32", "N_BLOCKS": "i32", "BLOCK_P": "constexpr", "BLOCK_E": "constexpr",
           "BLOCK_B": "constexpr", "BLOCK_M": "constexpr"}
    consts = {"BLOCK_P": MAX_PAIRS, "BLOCK_E": 512, "BLOCK_B": 64, "BLOCK_M": 16}  # V3: 256 experts (+ dropped)
    return [CompileSpec("moe_align[4096 pairs, 256 experts]", moe_align_kernel, sig, consts, {"num_warps": 4})]
