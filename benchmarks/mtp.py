"""MTP speculative decoding on the embedded model: acceptance rate and decode speed-up vs plain decoding.

Usage: python benchmarks/mtp.py [--backend cpu_ref] [--dtype bf16] [--max-new-tokens 96] [--repeats 3] [--compile]
       [--threads 1]
Prints one JSON object; docs/models/tiny.md records the measured numbers. `--compile`: plain and MTP decoding
through the compiled steps (docs/performance.md, compile part, "Seventh session": on the embedded model on a CPU
it does not pay).
"""
import argparse
import json
import statistics

import torch

import deepport
from deepport.bench import bench_interleaved

PROMPTS = [
    "import os\nimport sys\n\n\ndef main():\n",
    "class Node:\n    def __init__(self, value, next=None):\n",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "    for key, value in sorted(items):\n",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--backend", default="cpu_ref")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="decode through torch.compile'd steps")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    m = deepport.load(a.model, backend=a.backend, dtype=a.dtype, compile=a.compile)
    rows = []
    for p in PROMPTS:
        runs = bench_interleaved(m, [p], a.max_new_tokens, a.repeats)  # plain and MTP runs alternate
        plain, mtp = runs[False], runs[True]
        rows.append({"prompt": p, "plain_tok_s": plain["decode_tokens_per_s"], "mtp_tok_s": mtp["decode_tokens_per_s"],
                     "acceptance_rate": mtp["acceptance_rate"], "tokens_per_forward": mtp["tokens_per_forward"],
                     "speedup": mtp["decode_tokens_per_s"] / plain["decode_tokens_per_s"]})
    summary = {k: statistics.mean(r[k] for r in rows) for k in ("acceptance_rate", "tokens_per_forward", "speedup")}
    print(json.dumps({"backend": m.backend, "dtype": m.dtype, "model": str(m.path), "compiled": a.compile,
                      "prompts": rows, "mean": summary}, indent=2))


if __name__ == "__main__":
    main()
