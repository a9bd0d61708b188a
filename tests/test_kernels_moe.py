"""Fused moe_experts (align + grouped SwiGLU GEMMs + combine) under the interpreter, checked against cpu_ref."""
import pytest
import torch

from deepport.backends.cpu_ref import ops as ref
from deepport.core.errors import ContractError
from deepport.core.formats import Fp8Weight, quantize_weight
from deepport.kernels import moe_experts as k_moe
from deepport.kernels.moe_align import max_blocks, moe_align


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _routing(m, e, k, g):
    """Distinct experts per token; one pair on another rank (id -1); the last expert receives no token."""
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(m)])
    ids[0, -1] = -1
    return torch.rand(m, k, generator=g), ids


def _experts(e, d, i, dtype, fmt, g):
    ws = [torch.randn(e, i, d, generator=g) / d ** 0.5, torch.randn(e, d, i, generator=g) / i ** 0.5,
          torch.randn(e, i, d, generator=g) / d ** 0.5]
    if fmt:
        return [Fp8Weight(*quantize_weight(w, fmt)) for w in ws]
    return [w.to(dtype) for w in ws]


PATHS = pytest.mark.parametrize("max_pairs", [4096, 0], ids=["triton", "torch"])  # one-program kernel / torch ops


@PATHS
def test_moe_align_layout(max_pairs):
    ids = torch.tensor([[2, 0], [2, -1], [0, 2], [3, 2]])  # expert 1 gets nothing; one pair dropped
    sorted_pairs, block_expert = moe_align(ids, 4, 2, max_pairs)
    n_pairs = ids.numel()
    assert block_expert.shape[0] == max_blocks(8, 4, 2) == 8
    assert block_expert.tolist() == [0, 2, 2, 3, -1, -1, -1, -1]
    used = sorted_pairs[:8].view(4, 2).tolist()
    assert used == [[1, 4], [0, 2], [5, 7], [6, n_pairs]]  # pairs p = token * k + slot, padded with P
    assert (sorted_pairs[8:] == n_pairs).all()


@PATHS
def test_moe_align_is_a_permutation_of_the_routed_pairs(max_pairs):
    g = _gen(1)
    ids = torch.randint(-1, 9, (37, 3), generator=g)
    sorted_pairs, block_expert = moe_align(ids, 9, 8, max_pairs)
    rows = sorted_pairs.view(-1, 8)
    real = sorted_pairs[sorted_pairs < ids.numel()].long()
    assert sorted(real.tolist()) == [p for p in range(ids.numel()) if ids.flatten()[p] >= 0]
    for blk, e in enumerate(block_expert.tolist()):
        pairs = rows[blk][rows[blk] < ids.numel()].long()
        if e < 0:
            assert pairs.numel() == 0
        else:
            assert pairs.numel() > 0 and (ids.flatten()[pairs] == e).all()


def test_moe_align_kernel_matches_torch_path_at_v3_routing():
    g = _gen(2)
    ids = torch.stack([torch.randperm(256, generator=g)[:8] for _ in range(48)])  # 384 pairs over 256 experts
    ids[3, 2] = -1
    kernel, torch_ops = moe_align(ids, 256, 16), moe_align(ids, 256, 16, max_pairs=0)
    assert torch.equal(kernel[0], torch_ops[0]) and torch.equal(kernel[1], torch_ops[1])


# (M, D, I, E, k, dtype, fp8 format): D/I not multiples of the K tile (bf16), decode-sized (cpu_ref's
# gathered path) and prefill-sized (its per-expert loop) batches, e4m3fn and e4m3fnuz W8A8.
CASES = [
    (5, 96, 80, 6, 2, torch.bfloat16, None),
    (23, 96, 80, 6, 3, torch.bfloat16, None),
    (9, 64, 48, 8, 4, torch.float32, None),
    (7, 256, 128, 5, 3, torch.bfloat16, "e4m3fn"),
    (25, 128, 256, 4, 3, torch.bfloat16, "e4m3fn"),
    (4, 128, 256, 4, 2, torch.bfloat16, "e4m3fnuz"),
]


@pytest.mark.parametrize("m,d,i,e,k,dtype,fmt", CASES)
def test_moe_experts(m, d, i, e, k, dtype, fmt):
    g = _gen(m * 7 + d)
    x = (2 * torch.randn(m, d, generator=g)).to(dtype)
    topk_weights, topk_ids = _routing(m, e, k, g)
    w1, w2, w3 = _experts(e, d, i, dtype, fmt, g)
    got = k_moe.moe_experts(x, topk_weights, topk_ids, w1, w2, w3)
    with torch.no_grad():
        want = ref.moe_experts(x, topk_weights, topk_ids, w1, w2, w3)
    assert got.dtype == dtype and got.shape == (m, d)
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


def test_moe_experts_all_pairs_dropped_gives_zero():
    g = _gen(3)
    x = torch.randn(3, 64, generator=g)
    w1, w2, w3 = _experts(4, 64, 32, torch.float32, None, g)
    ids = torch.full((3, 2), -1)
    out = k_moe.moe_experts(x, torch.rand(3, 2, generator=g), ids, w1, w2, w3)
    assert torch.equal(out, torch.zeros_like(x))


def test_moe_experts_tile_config_from_caller():
    g = _gen(4)
    x = torch.randn(11, 96, generator=g).to(torch.bfloat16)
    topk_weights, topk_ids = _routing(11, 5, 2, g)
    ws = _experts(5, 96, 80, torch.bfloat16, None, g)
    a = k_moe.moe_experts(x, topk_weights, topk_ids, *ws, configs=[{"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}])
    b = k_moe.moe_experts(x, topk_weights, topk_ids, *ws, configs=[{"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}])
    torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)


def test_moe_experts_never_reads_back_to_host(monkeypatch):
    g = _gen(5)
    x = torch.randn(6, 128, generator=g).to(torch.bfloat16)
    topk_weights, topk_ids = _routing(6, 4, 2, g)
    ws = _experts(4, 128, 128, torch.bfloat16, "e4m3fn", g)

    def refuse(*a, **k):
        raise AssertionError("host synchronisation (.item / .tolist) on the moe_experts hot path")

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "item", refuse)
        mp.setattr(torch.Tensor, "tolist", refuse)
        sorted_pairs, block_expert = moe_align(topk_ids, 4, 16)
        got = k_moe.moe_experts(x, topk_weights, topk_ids, *ws)
    assert block_expert.shape[0] == max_blocks(12, 4, 16)
    torch.testing.assert_close(got, ref.moe_experts(x, topk_weights, topk_ids, *ws), rtol=1.6e-2, atol=1e-2)


def test_moe_experts_preconditions():
    g = _gen(6)
    x = torch.randn(2, 96, generator=g)
    tw, ids = _routing(2, 4, 2, g)
    fp8 = _experts(4, 128, 128, torch.bfloat16, "e4m3fn", g)
    plain = _experts(4, 96, 64, torch.float32, None, g)
    with pytest.raises(ContractError, match="all be Fp8Weight"):
        k_moe.moe_experts(x, tw, ids, fp8[0], plain[1], plain[2])
    with pytest.raises(ContractError, match="multiples of 128"):
        k_moe.moe_experts(x, tw, ids, *_experts(4, 96, 128, torch.bfloat16, "e4m3fn", g))
    with pytest.raises(ContractError, match="must be in x.dtype"):
        k_moe.moe_experts(x.bfloat16(), tw, ids, *plain)
    with pytest.raises(ContractError, match=r"\[E, I, D=96\]"):
        k_moe.moe_experts(x, tw, ids, plain[0], plain[1], plain[0][:, :32])
