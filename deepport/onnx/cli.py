"""`deepport export-onnx`: write the prefill graph (or one decode step) as ONNX with deepport-domain functions."""
from __future__ import annotations

from deepport import json_out
from deepport.core.errors import DeepportError


def cmd_export_onnx(a) -> int:
    from collections import Counter

    from pathlib import Path

    from deepport.core import output_dir
    from deepport.core.formats import fp8_format

    try:
        from deepport.onnx import export
    except ImportError as e:
        if e.name not in ("onnx", "onnxruntime") and not (e.name or "").startswith("onnx."):
            raise
        raise DeepportError(f"export-onnx needs the onnx extra ({e.name} is not installed); "
                            f"pip install 'deepport[onnx]'") from None

    staged = dict(force=a.force, what="export-onnx --output", companions=(".data",))
    output_dir.check(a.output, kind="file", **staged)  # before the trace, not after it
    t = export.build(a.model, a.dtype, fp8_format(a.fp8_format))
    if a.decode:
        m = export.decode_model(t, a.dtype, block_size=a.block_size)
    else:
        m = export.prefill_model(t, a.dtype)
    with output_dir.staged_files(a.output, **staged) as tmp:
        export.save(m, tmp, external=True if a.external_data else None)
    out = Path(a.output)
    nodes = Counter(n.op_type for n in m.graph.node if n.domain == "deepport")
    summary = {"output": str(out), "graph": "decode" if a.decode else "prefill", "dtype": a.dtype,
               "source": t.source, "inputs": [i.name for i in m.graph.input],
               "outputs": [o.name for o in m.graph.output], "deepport_nodes": dict(sorted(nodes.items())),
               "external_data": (out.parent / (out.name + ".data")).is_file(), "checker": "full_check passed"}
    json_out.emit_json(summary, a.json)
    print(f"wrote {out} ({summary['graph']}, {a.dtype}, from {t.source}); onnx.checker full_check passed")
    print(f"inputs: {', '.join(summary['inputs'][:6])}{' ...' if len(summary['inputs']) > 6 else ''}")
    print(f"outputs: {', '.join(summary['outputs'][:6])}{' ...' if len(summary['outputs']) > 6 else ''}")
    print("deepport nodes: " + ", ".join(f"{k} x{v}" for k, v in summary["deepport_nodes"].items()))
    return 0


def register(sub) -> None:
    from deepport import cli_checks

    p = sub.add_parser("export-onnx", help="export the graph to ONNX (deepport-domain functions, opset 21)")
    p.add_argument("--model", default=None, help="HF checkpoint directory or preset name (default: embedded model)")
    p.add_argument("--output", required=True, metavar="FILE", help="the .onnx file (weights beside it when large)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp8"),
                   help="fp8: Float8E4M3FN weights with 128x128 block scales, W8A8 linears, fp32 activations")
    p.add_argument("--fp8-format", default="e4m3fn", choices=("e4m3fn", "e4m3fnuz"),
                   help="fp8 encoding of the weights with --dtype fp8 (e4m3fnuz for MI300)")
    p.add_argument("--decode", action="store_true",
                   help="one decode step with the latent KV cache as explicit inputs and outputs")
    p.add_argument("--block-size", type=cli_checks.positive_int, default=16, help="cache block size used for the trace (any works after)")
    p.add_argument("--external-data", action="store_true",
                   help="weights in FILE.data beside the model (automatic above 1 GiB of weights)")
    json_out.add_json_argument(p, "a summary (inputs, outputs, deepport nodes)")
    p.add_argument("--force", action="store_true", help="replace an existing FILE (and its FILE.data)")
    p.set_defaults(fn=cmd_export_onnx)
