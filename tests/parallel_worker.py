"""One rank of a tests/test_parallel.py run (RANK / WORLD_SIZE / MASTER_* set by the test, as torchrun does).

argv: out_dir model dtype tp ep. Writes rank<r>.pt: logits of fixed seeded prompts, greedy (and MTP greedy)
tokens, this rank's weight and read bytes, or the error message of a refused configuration.
"""
import os
import sys

import torch

import deepport
from deepport.core import distributed
from deepport.core.errors import DeepportError
from deepport.core.parallel import weight_bytes

IDS = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(7))


def main() -> int:
    out, model, dtype, tp, ep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    result = {"rank": rank}
    try:
        m = deepport.load(None if model == "default" else model, backend="cpu_ref", dtype=dtype, tp=tp, ep=ep,
                          timeout_s=60)
    except DeepportError as e:
        torch.save({**result, "error": f"{type(e).__name__}: {e}"}, os.path.join(out, f"rank{rank}.pt"))
        return 3
    result["logits"] = m.logits(IDS)
    prompts = IDS.tolist()
    result["tokens"] = [r.tokens for r in m.generate_batch(prompts, max_new_tokens=6)]
    if m.args.n_mtp_layers:
        result["mtp_tokens"] = m.generate(prompts[0], max_new_tokens=6, mtp=True).tokens
    result["sampled"] = m.generate(prompts[1], max_new_tokens=4, temperature=1.0, seed=3).tokens
    result["weight_bytes"] = weight_bytes(m.transformer)
    plan = m.shard_plan
    result["bytes_read"], result["bytes_total"] = plan.bytes_read, plan.bytes_total
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
