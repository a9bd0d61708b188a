"""deepport/backends/torch_common.py: the torch-native sample and collectives device backends bind."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from deepport.backends import torch_common
from deepport.backends.cpu_ref import ops as ref
from deepport.core.errors import ContractError


def _logits(seed=0):
    return 3 * torch.randn(4, 50, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax_lowest_index_on_ties():
    logits = _logits()
    logits[1, [3, 9]] = logits[1].max() + 1
    assert torch.equal(torch_common.sample(logits, 0.0, 1.0, None), ref.sample(logits, 0.0, 1.0, None))
    assert int(torch_common.sample(logits, 0.0, 1.0, None)[1]) == 3


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_seeded_sampling_draws_what_cpu_ref_draws(top_p):
    logits = _logits(1)
    got = torch_common.sample(logits, 0.8, top_p, torch.Generator().manual_seed(7))
    want = ref.sample(logits, 0.8, top_p, torch.Generator().manual_seed(7))
    assert torch.equal(got, want)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[5.0, 4.9, -10.0, -10.0]])
    draws = {int(torch_common.sample(logits, 1.0, 0.5, torch.Generator().manual_seed(s))) for s in range(20)}
    assert draws == {0}  # token 0 alone holds >= 50% of the mass


def test_single_process_collectives_are_identity_and_fp8_reduce_is_refused():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    assert torch_common.all_reduce(x) is x
    assert torch_common.all_to_all(x, [6], [6]) is x
    with pytest.raises(ContractError, match="upcast"):
        torch_common.all_reduce(x.to(torch.float8_e4m3fn))
    with pytest.raises(ContractError, match="sum to 5"):
        torch_common.all_to_all(x, [6], [5])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # uneven MoE-style dispatch: rank 0 sends 1 row to itself and 3 to rank 1; rank 1 sends 2 and 0
        send = {0: [1, 3], 1: [2, 0]}[rank]
        recv = [send_of[rank] for send_of in ({0: [1, 3], 1: [2, 0]}[q] for q in range(world))]
        x = (torch.arange(sum(send) * 8, dtype=torch.float32).view(-1, 8) / 7 + 100 * rank)
        codes = x.to(torch.float8_e4m3fn)
        got = torch_common.all_to_all(codes, recv, send)
        total = torch_common.all_reduce(torch.full((3,), float(rank + 1), dtype=torch.bfloat16))
        out[rank] = (got.dtype, got.view(torch.uint8).clone(), total.clone())
    finally:
        dist.destroy_process_group()


def test_gloo_all_to_all_moves_fp8_as_bytes_and_all_reduce_sums():
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        got = dict(out)
    rows = {r: ((torch.arange(n * 8, dtype=torch.float32).view(-1, 8) / 7 + 100 * r).to(torch.float8_e4m3fn))
            for r, n in ((0, 4), (1, 2))}
    want0 = torch.cat([rows[0][:1], rows[1][:2]])  # rank 0 receives 1 row from itself, 2 from rank 1
    want1 = torch.cat([rows[0][1:4], rows[1][2:2]])
    for rank, want in ((0, want0), (1, want1)):
        dtype, bytes_, total = got[rank]
        assert dtype == torch.float8_e4m3fn
        assert torch.equal(bytes_, want.view(torch.uint8))
        assert torch.equal(total, torch.full((3,), 3.0, dtype=torch.bfloat16))
