"""`deepport` command line: backends, generate, conformance, convert, bench, new-backend."""
from __future__ import annotations

import argparse
import sys

from deepport import cli_checks, json_out
from deepport.core.errors import DeepportError


def _add_backend_args(p, dtypes=("auto", "fp8", "bf16", "fp32")):
    p.add_argument("--backend", default="auto", help="backend name (default: DEEPPORT_BACKEND, else auto)")
    p.add_argument("--dtype", default="auto", choices=dtypes,
                   help="auto: the checkpoint's dtype where the backend supports it, else the backend's best")
    p.add_argument("--fallback", default="reference", choices=("reference", "error"),
                   help="ops the backend lacks run cpu_ref code on its device (reference) or refuse (error)")


def cmd_backends(a) -> int:
    from deepport.core import registry

    rows = []
    for b in registry.discover().values():
        p = registry.safe_probe(b)
        row = {"name": b.name, "available": p.available, "reason": p.reason, "device_type": b.device_type,
               "dtypes": sorted(b.dtypes), "fp8_format": None, "origin": b.origin, "dist_backend": b.dist_backend}
        if p.available:
            try:
                f = b.resolve_fp8_format()
                row["fp8_format"] = f.name if f else None
                row["ops"] = registry.op_counts(b)
            except DeepportError as e:
                row["available"], row["reason"] = False, str(e)
        elif isinstance(b.fp8_format, str):
            row["fp8_format"] = b.fp8_format
        rows.append(row)
    json_out.emit_json(rows, a.json)
    print(f"{'backend':<10} {'status':<11} {'device':<7} {'dtypes':<15} {'fp8':<9} {'origin':<8} ops (native/composite/fallback)")
    for r in rows:
        ops = r.get("ops")
        ops_s = f"{ops['native']}/{ops['composite']}/{ops['fallback']}" if ops else "-"
        print(f"{r['name']:<10} {'available' if r['available'] else 'unavailable':<11} {r['device_type']:<7} "
              f"{','.join(r['dtypes']):<15} {r['fp8_format'] or '-':<9} {r['origin']:<8} {ops_s}")
        if not r["available"] or r["reason"]:
            print(f"{'':<10}   {r['reason']}")
    return 0


def cmd_generate(a) -> int:
    import deepport
    from deepport.core import distributed

    try:
        m = deepport.load(a.model, backend=a.backend, dtype=a.dtype, fallback=a.fallback, tp=a.tp, ep=a.ep,
                          dp_attention=a.dp_attention, check_weights=a.check_weights, compile=a.compile,
                          graphs=a.graphs)
        prompt = a.prompt if a.prompt is not None else "def fibonacci(n):\n"
        if a.prompt_ids:
            prompt = a.prompt_ids
        r = m.generate(prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                       seed=a.seed, mtp=a.mtp)
    finally:
        distributed.shutdown()
    if not m.is_rank0:  # under torchrun every rank holds the same tokens; rank 0 prints
        return 0
    json_out.emit_json({"text": r.text, "tokens": r.tokens, "stats": r.stats, "backend": m.backend,
                        "dtype": m.dtype, "served_as": m.served_as, "model": str(m.path),
                        "parallel": {"tp": a.tp, "ep": a.ep}}, a.json, indent=None)
    fallbacks = [op for op, how in m.op_report().items() if how == "fallback"]
    print(f"# backend {m.backend}, dtype {m.dtype}, model {m.path}", file=sys.stderr)
    if fallbacks:
        print(f"# ops on the cpu_ref fallback: {', '.join(fallbacks)}", file=sys.stderr)
    if m.step is not None:
        print(f"# decode steps: {m.step.describe()}, first calls {m.step.compile_s:.1f} s", file=sys.stderr)
    unfused = [op for op, src in m.op_sources().items() if src.startswith("generic")]
    if unfused:
        print(f"# ops on the backend's generic torch path (no fused kernel): {', '.join(unfused)}", file=sys.stderr)
    print((prompt if isinstance(prompt, str) else "") + r.text)
    s = r.stats
    line = (f"# prefill {s['prefill_tokens_per_s']:.1f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s"
            f" ({len(r.tokens)} tokens)")
    if m.step is not None and m.step.compile_s:
        # a process's first compiled steps trace and generate code: this decode rate is not the steady one
        line += " (includes compilation; steady-state rates: deepport bench --compile)"
    if "acceptance_rate" in s:
        line += f", MTP acceptance {s['acceptance_rate']:.2f}, {s['tokens_per_forward']:.2f} tokens/forward"
    print(line, file=sys.stderr)
    return 0


def cmd_convert(a) -> int:
    from deepport.core.checkpoint import convert

    out = convert(a.input, a.output, a.dtype, a.fp8_format, force=a.force)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = cli_checks.Parser(prog="deepport", description="Run DeepSeek-V3 on any accelerator.")
    ap.add_argument("--version", action="version", version=cli_checks.version_text(),
                    help="print the version and where the docs named in messages are, then exit")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=cli_checks.Parser)

    p = sub.add_parser("backends", help="list discovered backends and whether they are available")
    json_out.add_json_argument(p, "the list of backends")
    p.set_defaults(fn=cmd_backends)

    p = sub.add_parser("generate", help="generate text (default: the embedded tiny model)")
    p.add_argument("--model", default=None, help="HF checkpoint directory or preset name (default: embedded model)")
    _add_backend_args(p)
    p.add_argument("--prompt", default=None, type=cli_checks.utf8_text,
                   help="UTF-8 prompt text (default: a Python function header)")
    p.add_argument("--prompt-ids", default=None, type=cli_checks.token_ids,
                   help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-new-tokens", type=cli_checks.positive_int, default=48, help="tokens to generate at most")
    p.add_argument("--temperature", type=cli_checks.temperature, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=cli_checks.top_p, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=cli_checks.seed, default=None, help="sampling seed (default: 0)")
    p.add_argument("--no-check-weights", dest="check_weights", action="store_false",
                   help="skip the NaN/inf weight and fp8 scale checks at load (docs/robustness.md)")
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the MTP module")
    p.add_argument("--compile", action="store_true", help="decode with the torch.compile'd step (docs/compile.md)")
    p.add_argument("--graphs", action="store_true", help="capture decode steps as CUDA/HIP graphs (cuda/rocm)")
    json_out.add_json_argument(p, "text, tokens and stats")
    p.add_argument("--tp", type=cli_checks.positive_int, default=1,
                   help="tensor-parallel ranks (run under torchrun; docs/parallel.md)")
    p.add_argument("--ep", type=cli_checks.positive_int, default=1,
                   help="expert-parallel ranks (torchrun --nproc-per-node = tp x ep)")
    p.add_argument("--dp-attention", action="store_true",
                   help="with --ep and --tp 1: each rank attends for and caches only its own sequences")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("convert", help="rewrite a checkpoint as bf16 / fp32 / fp8 (e4m3fn or e4m3fnuz)")
    p.add_argument("input", help="source checkpoint directory (HF DeepSeek-V3 format)")
    p.add_argument("output", help="directory to write")
    p.add_argument("--dtype", required=True, choices=("bf16", "fp32", "fp8"), help="dtype of the written weights")
    p.add_argument("--fp8-format", default="e4m3fn", choices=("e4m3fn", "e4m3fnuz"),
                   help="fp8 encoding with --dtype fp8 (e4m3fnuz for MI300: scales doubled)")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty OUTPUT as a whole (its old files are removed, never merged)")
    p.set_defaults(fn=cmd_convert)

    # Subcommands that live beside their subsystem; each module defines register(subparsers).
    for extra in ("deepport.conformance.cli", "deepport.bench", "deepport.porting", "deepport.onnx.cli",
                  "deepport.train", "deepport.hardware_report"):
        try:
            mod = __import__(extra, fromlist=["register"])
        except ImportError as e:
            if e.name is None or not e.name.startswith(extra.rsplit(".", 1)[0]):
                raise
            continue
        mod.register(sub)
    return ap


def main(argv=None) -> int:
    code = _run(argv)
    parallel = sys.modules.get("deepport.core.distributed")  # loaded only by runs that may have joined a group
    return parallel.exit_after_group(code) if parallel is not None else code


def _run(argv) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        with json_out.stdout_reserved(getattr(a, "json", None)):
            return a.fn(a)
    except DeepportError as e:
        print(f"deepport: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `deepport ... | head`: the reader has what it wanted
        return cli_checks.quiet_broken_pipe()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
