"""`deepport bench`: generation throughput (with and without MTP) of a model on a backend."""
from __future__ import annotations

import statistics
import sys

from deepport import json_out


def bench_interleaved(model, prompts, max_new_tokens: int, repeats: int, modes=(False, True)) -> dict:
    """Per mode (False: plain decoding, True: MTP), the medians of `repeats` runs after one warm-up each, the
    modes' runs alternating (plain, MTP, plain, ...) so that a machine's drift lands on both alike."""
    for mtp in modes:  # warm-up with the timed runs' shapes: a compiled step compiles one graph per cache size
        model.generate_batch(prompts, max_new_tokens=max_new_tokens, mtp=mtp)
    runs = {mtp: [] for mtp in modes}
    for _ in range(repeats):
        for mtp in modes:
            runs[mtp].append(model.generate_batch(prompts, max_new_tokens=max_new_tokens, mtp=mtp)[0].stats)
    out = {}
    for mtp, rs in runs.items():
        keys = ("decode_tokens_per_s", "prefill_tokens_per_s") + (("acceptance_rate", "tokens_per_forward") if mtp else ())
        out[mtp] = {k: statistics.median(r[k] for r in rs) for k in keys}
    return out


def cmd_bench(a) -> int:
    import deepport
    from deepport.core.errors import ConfigError

    if a.json == "ops":  # `bench --json ops`: argparse took the sub-command as --json's FILE
        raise ConfigError("--json took 'ops' as its file name; put the options after ops: deepport bench ops --json")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    # with --compare (--mtp), --compile/--graphs put the compiled (captured) step against transformers (plain
    # decoding of the same step); alone they compare deepport's eager and compiled steps (below), which loads
    # the compiled model itself
    fast = bool(a.compare or a.mtp) and (a.compile or a.graphs)
    m = deepport.load(a.model, backend=a.backend, dtype=a.dtype, fallback=a.fallback,
                      compile=fast and a.compile, graphs=fast and a.graphs)
    from deepport.bench_compare import batch_rows

    prompts = batch_rows(m.encode(a.prompt), a.batch, a.distinct_rows)
    differ = len({tuple(r) for r in prompts})
    if a.distinct_rows and differ < a.batch:
        print(f"deepport: --distinct-rows: the prompt is {len(prompts[0])} token(s) long, so only {differ} of the "
              f"{a.batch} rows differ (rows are its rotations); give a --prompt of at least {a.batch} tokens",
              file=sys.stderr)
    report = {"backend": m.backend, "dtype": m.dtype, "model": str(m.path), "batch": a.batch,
              "distinct_rows": a.distinct_rows, "max_new_tokens": a.max_new_tokens, "repeats": a.repeats}
    if a.compare:  # deepport vs transformers eager, interleaved (deepport/bench_compare.py)
        from deepport import bench_compare
        import torch

        report["threads"] = torch.get_num_threads()
        report["deepport_step"] = m.step.describe() if m.step is not None else "eager"
        report["compare"] = bench_compare.compare(m, a.prompt, a.batch, a.max_new_tokens, a.repeats, a.distinct_rows)
        json_out.emit_json(report, a.json)
        bench_compare.print_comparison(report)
        return 0
    if (a.compile or a.graphs) and not a.mtp:  # eager vs compiled (vs graphs), host-overhead share: deepport/bench_step.py
        from deepport import bench_step

        def load(compile, graphs):
            return m if not (compile or graphs) else deepport.load(
                a.model, backend=a.backend, dtype=a.dtype, fallback=a.fallback, compile=compile, graphs=graphs)

        report["step_compare"] = bench_step.compare(load, prompts, a.max_new_tokens, a.repeats, a.graphs)
        json_out.emit_json(report, a.json)
        bench_step.print_report(report)
        return 0
    rows = " (distinct rows)" if a.distinct_rows and a.batch > 1 else ""
    report["deepport_step"] = m.step.describe() if m.step is not None else "eager"
    print(f"# bench: backend {m.backend}, dtype {m.dtype}, batch {a.batch}{rows}, {a.max_new_tokens} new tokens, "
          f"decode steps {report['deepport_step']}", file=sys.stderr)
    modes = (False, True) if a.mtp and m.args.n_mtp_layers else (False,)
    runs = bench_interleaved(m, prompts, a.max_new_tokens, a.repeats, modes)  # plain and MTP runs alternate
    report["plain"] = runs[False]
    if True in runs:
        report["mtp"] = runs[True]
        report["mtp_speedup"] = report["mtp"]["decode_tokens_per_s"] / max(report["plain"]["decode_tokens_per_s"], 1e-9)
    json_out.emit_json(report, a.json)
    p = report["plain"]
    print(f"plain: decode {p['decode_tokens_per_s']:.1f} tok/s, prefill {p['prefill_tokens_per_s']:.1f} tok/s")
    if "mtp" in report:
        q = report["mtp"]
        print(f"mtp:   decode {q['decode_tokens_per_s']:.1f} tok/s, acceptance {q['acceptance_rate']:.2f}, "
              f"{q['tokens_per_forward']:.2f} tokens/forward, speed-up {report['mtp_speedup']:.2f}x")
    return 0


def register(sub) -> None:
    from deepport import cli_checks
    from deepport.cli import _add_backend_args

    p = sub.add_parser("bench", help="measure generation throughput (and the MTP speed-up)")
    p.add_argument("--model", default=None, help="HF checkpoint directory or preset name (default: embedded model)")
    _add_backend_args(p)
    p.add_argument("--prompt", default="import os\nimport sys\n\n\ndef main():\n", type=cli_checks.utf8_text,
                   help="the prompt every sequence of the batch starts from")
    p.add_argument("--batch", type=cli_checks.positive_int, default=1, help="sequences decoded together")
    p.add_argument("--distinct-rows", action="store_true",
                   help="row r of the batch starts from the prompt's tokens rotated by r (same length, different "
                        "sequences: the rows route to different experts, as a real batch does); default: every row "
                        "the same prompt, which decodes identically and touches one token's experts")
    p.add_argument("--max-new-tokens", type=cli_checks.positive_int, default=64, help="tokens generated per sequence")
    p.add_argument("--repeats", type=cli_checks.positive_int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--mtp", action="store_true", help="also measure MTP speculative decoding (with --compile: both "
                                                        "plain and MTP decoding through the compiled steps)")
    json_out.add_json_argument(p)
    p.add_argument("--compare", choices=("transformers",), default=None,
                   help="also run transformers' DeepseekV3ForCausalLM (eager) on the same weights and print ratios")
    p.add_argument("--compile", action="store_true",
                   help="decode tok/s eager vs the torch.compile'd step (tokens compared), host-overhead shares; "
                        "with --compare: the compiled step against transformers")
    p.add_argument("--graphs", action="store_true", help="also the step captured as CUDA/HIP graphs (cuda/rocm)")
    p.add_argument("--threads", type=cli_checks.positive_int, default=None, help="torch threads for the run (default: torch's)")
    p.set_defaults(fn=cmd_bench)

    from deepport.bench_ops import register as register_ops

    register_ops(p)  # `deepport bench ops [--op ...]`: the op benchmarks (deepport/bench_ops/)
