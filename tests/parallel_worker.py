"""One rank of a tests/test_parallel.py run (RANK / WORLD_SIZE / MASTER_* set by the test, as torchrun does).

argv: out_dir model dtype tp ep [dp] (dp: data-parallel attention). Writes rank<r>.pt with `collect`'s results (the test runs the same
function in one process for the expected values), or the error of a refused configuration.
Model "collectives": the all_to_all / all_reduce contracts alone (fp8 rows over gloo, uneven splits).
"""
import os
import sys

import torch

import deepport
from deepport.core import distributed
from deepport.core.errors import DeepportError
from deepport.core.generate import generate
from deepport.core.parallel import weight_bytes

IDS = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(7))  # ids < every model's vocab


def collect(m) -> dict:
    """Logits of seeded prompts, greedy / MTP-greedy / seeded-sampled tokens, weight, cache and checkpoint bytes."""
    prompts = IDS.tolist()
    greedy = generate(m.transformer, prompts, 6, eos_id=m.args.eos_token_id)
    out = {"logits": m.logits(IDS),
           "tokens": greedy.tokens,
           # the row pools only: the one scratch block (padding rows' target) is per cache, not per row
           "cache_bytes": sum(t[:greedy.cache.scratch].numel() * t.element_size()
                              for t in greedy.cache.kv + greedy.cache.pe),
           "sampled": m.generate(prompts[1], max_new_tokens=4, temperature=1.0, seed=3).tokens,
           "weight_bytes": weight_bytes(m.transformer)}
    if m.args.n_mtp_layers:
        out["mtp_tokens"] = m.generate(prompts[0], max_new_tokens=6, mtp=True).tokens
    if m.shard_plan is not None:
        out["bytes_read"], out["bytes_total"] = m.shard_plan.bytes_read, m.shard_plan.bytes_total
    return out


def rows_for(src: int, dst: int) -> torch.Tensor:
    """The fp8 rows rank `src` sends rank `dst` in the collectives check: src + dst + 1 seeded rows of 8."""
    g = torch.Generator().manual_seed(100 * src + dst)
    return (torch.randn(src + dst + 1, 8, generator=g) * 50).to(torch.float8_e4m3fn)


def exchange(rank: int, n: int) -> dict:
    """all_to_all of fp8 rows with uneven splits (gloo lacks fp8: the contract sends uint8 views) and all_reduce."""
    import torch.distributed as dist

    from deepport.core import registry

    ops = registry.bind(registry.get_backend("cpu_ref"))
    dist.init_process_group("gloo")
    send = torch.cat([rows_for(rank, q) for q in range(n)])
    got = ops.all_to_all(send, [q + rank + 1 for q in range(n)], [rank + q + 1 for q in range(n)])
    total = ops.all_reduce(torch.full((3,), float(rank + 1), dtype=torch.bfloat16))
    dist.destroy_process_group()
    return {"received": got, "sum": total}


def main() -> int:
    out, model, dtype, tp, ep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    dp = sys.argv[6:] == ["dp"]
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if model == "collectives":
        torch.save({"rank": rank, **exchange(rank, tp * ep)}, os.path.join(out, f"rank{rank}.pt"))
        return 0
    try:
        m = deepport.load(None if model == "default" else model, backend="cpu_ref", dtype=dtype, tp=tp, ep=ep,
                          dp_attention=dp, timeout_s=60)
    except DeepportError as e:
        torch.save({"rank": rank, "error": f"{type(e).__name__}: {e}"}, os.path.join(out, f"rank{rank}.pt"))
        return 3
    result = {"rank": rank, **collect(m)}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(distributed.exit_after_group(main()))  # as the CLI does: no interpreter teardown after a group
