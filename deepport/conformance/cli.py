"""`deepport conformance`: run the suite on a backend, print the table, write JSON / JUnit / markdown reports."""
from __future__ import annotations

import sys
import time

from deepport.core import settings


class LineProgress:
    """One live line on stderr when it is a terminal (and DEEPPORT_PROGRESS is not 0); silent otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = settings.progress_enabled() and self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int, text: str) -> None:
        if self.enabled:
            line = f"[{done}/{total} {time.perf_counter() - self.t0:5.1f}s] {text}"
            self.stream.write("\r" + line[:119].ljust(119))
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 119 + "\r")
            self.stream.flush()


def cmd_conformance(a) -> int:
    from deepport.conformance import report
    from deepport.conformance.runner import run
    from deepport.core import registry

    if a.list:
        from deepport.conformance.cases import all_cases

        from deepport import json_out

        cases = all_cases(a.tier, _ops(a.ops), None if a.dtype == "all" else (a.dtype,) if a.dtype != "fp32" else ())
        json_out.emit_json([{"name": c.name, "op": c.op, "dtype": c.dtype, "note": c.note} for c in cases], a.json)
        for c in cases:
            print(f"{c.name:<40} {c.op:<15} {c.dtype:<5} {c.note}")
        return 0
    from deepport.core import distributed
    from deepport.core.errors import ConfigError

    from deepport import cli_checks

    for path, flag in ((a.junit, "--junit"), (a.markdown, "--markdown")):  # --json FILE: checked at parse time
        cli_checks.check_writable(path, flag)  # now, not after a long run
    backend = registry.select(a.backend) if a.backend in (None, "auto") else registry.get_backend(a.backend)
    dtypes = ("fp8", "bf16", "fp32") if a.dtype == "all" else (a.dtype,)
    if a.tp * a.ep > 1 and not a.model_check:
        raise ConfigError("--tp/--ep shard the end-to-end model check; add --model-check")
    progress = LineProgress()
    _join_ranks(backend, a)
    try:
        rep = run(backend, tier=a.tier, dtypes=dtypes, ops=_ops(a.ops), fallback=a.fallback, progress=progress,
                  model_check=a.model_check, cross_check=a.cross_check, parallel=(a.tp, a.ep))
    finally:
        progress.close()
        distributed.shutdown()
    if distributed.env_rank()[0] != 0:  # under torchrun rank 0 reports (every rank ran the same checks)
        return rep.exit_code
    report.print_table(rep)
    report.write_json(rep, a.json)
    for path, write in ((a.junit, report.write_junit), (a.markdown, report.write_markdown)):
        if path:
            write(rep, path)
            print(f"wrote {path}", file=sys.stderr)
    return rep.exit_code


def _join_ranks(backend, a) -> None:
    """Under torchrun without a sharded model check: join the process group (the backend's dist_backend), so the
    collective cases (all_reduce, all_to_all) run across every rank. `--model-check --tp/--ep` joins its own."""
    import torch
    import torch.distributed as dist

    from deepport.core import distributed

    _, size, local_rank = distributed.env_rank()
    if size > 1 and a.tp * a.ep == 1 and not dist.is_initialized():
        device = backend.device()
        if device.type != "cpu" and hasattr(getattr(torch, device.type, None), "set_device"):
            getattr(torch, device.type).set_device(local_rank)
        dist.init_process_group(backend.dist_backend)


def _ops(text):
    return [o.strip() for o in text.split(",") if o.strip()] if text else None


def register(sub) -> None:
    from deepport import cli_checks, json_out

    p = sub.add_parser("conformance", help="check a backend op by op against cpu_ref; exit 0 only when nothing fails")
    p.add_argument("--backend", default="auto", help="backend name (default: DEEPPORT_BACKEND, else auto)")
    p.add_argument("--dtype", default="all", choices=("fp8", "bf16", "fp32", "all"),
                   help="which cases to run (default all; fp32 has no op cases of its own, the bf16 cases' fp32-input "
                        "variants cover fp32 inputs: it adds the fp32 model check)")
    p.add_argument("--tier", default="quick", choices=("quick", "full"),
                   help="quick: small shapes (CI, interpreter); full: DeepSeek-V3's real dims")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: every contract)")
    p.add_argument("--fallback", default="reference", choices=("reference", "error"),
                   help="ops the backend lacks run cpu_ref code and report `fallback` (reference) or fail (error)")
    json_out.add_json_argument(p, "the report (schema: docs/conformance.md)")
    p.add_argument("--junit", default=None, metavar="FILE", help="write JUnit XML for CI")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the markdown capability matrix")
    p.add_argument("--model-check", action="store_true", help="add the end-to-end checks on the tiny checkpoint")
    p.add_argument("--cross-check", default=None, choices=("onnxruntime",),
                   help="add the ONNX Runtime cross-check of the exported graph")
    p.add_argument("--list", action="store_true", help="list the cases (name, op, dtype, note) and exit")
    p.add_argument("--tp", type=cli_checks.positive_int, default=1, help="with --model-check under torchrun: tensor-parallel ranks")
    p.add_argument("--ep", type=cli_checks.positive_int, default=1, help="with --model-check under torchrun: expert-parallel ranks")
    p.set_defaults(fn=cmd_conformance)
