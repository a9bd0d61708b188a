"""Export deepport's own graph (core/model.py) to ONNX: prefill, or one decode step over the latent cache.

The Transformer is built with the export op table (deepport/onnx/nodes.py): each contract call becomes a
`deepport.<function>` node whose body (deepport/onnx/functions.py) is attached to the model as an ONNX
function; the torch ops between contract calls are exported by torch.onnx's TorchScript exporter.
FP8 weights stay Float8E4M3FN (or E4M3FNUZ) initializers with 128x128 block scales, dequantised inside
the nodes by blocked DequantizeLinear; activations are quantised by blocked QuantizeLinear (1x128).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import onnx
import torch
from torch import nn

import deepport
from deepport import models
from deepport.core import checkpoint, config_checks
from deepport.core.errors import ConfigError, DeepportError
from deepport.core.formats import E4M3FN, Fp8Format
from deepport.core.model import AttnContext, Transformer
from deepport.onnx import functions, nodes

TORCH_OPSET = 20  # the TorchScript exporter's highest; the model is then stamped opset 21 (see _finish)
EXTERNAL_DATA_BYTES = 1 << 30  # above this, weights go to a side file (protobuf's 2 GiB limit)
# Activation dtype per --dtype: fp8 keeps fp8 weights with fp32 activations, so onnxruntime's CPU EP
# (which lacks bf16 kernels for most ops) runs the export; a vendor EP may cast activations to bf16.
ACT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float32}


def build(model=None, dtype: str = "fp32", fmt: Fp8Format = E4M3FN) -> Transformer:
    """A Transformer on CPU bound to the export op table, weights loaded from `model` (dir, preset or None)."""
    if dtype not in ACT_DTYPES:
        raise ConfigError(f"unknown export dtype {dtype!r}; use one of {', '.join(ACT_DTYPES)}")
    path = models.resolve(model, fp8=dtype == "fp8")
    args, _ = checkpoint.read_config(path)
    fp8 = fmt if dtype == "fp8" else None
    config_checks.check_fits(args, dtype, "cpu")
    t = Transformer(args, nodes.table(fp8), dtype=ACT_DTYPES[dtype], fp8=fp8, device="meta")
    checkpoint.load_into(t, path, ACT_DTYPES[dtype], fp8, torch.device("cpu"))
    t.inv_freq = t.inv_freq.cpu()
    t.source = str(path)
    return t.eval()


class Prefill(nn.Module):
    """input_ids [B, S] -> logits [B, S, V] and MTP logits [B, S-1, V] (position i: h_i with token i+1)."""

    def __init__(self, t: Transformer):
        super().__init__()
        self.t = t

    def forward(self, input_ids):
        h = self.t(input_ids)
        logits = self.t.logits(h)
        if not self.t.args.n_mtp_layers:
            return logits
        return logits, self.t.logits(self.t.mtp_forward(h[:, :-1], input_ids[:, 1:]))


class ExportCache:
    """The latent cache as graph values: `write` scatters out of place, so the updated pools become outputs."""

    def __init__(self, kv: list, pe: list, cache_lens: torch.Tensor, block_table: torch.Tensor):
        self.kv, self.pe, self.cache_lens, self.block_table = kv, pe, cache_lens, block_table

    def write(self, layer: int, slots, kv, pe) -> None:
        flat = slots.reshape(-1)
        for pool, new in ((self.kv, kv), (self.pe, pe)):
            rows = pool[layer].reshape(-1, pool[layer].shape[-1])
            rows = rows.index_put((flat,), new.reshape(-1, new.shape[-1]).to(rows.dtype))
            pool[layer] = rows.reshape(pool[layer].shape)

    def advance(self, rows, n_new) -> None:  # lengths are the caller's: cache_lens + S after the step
        pass


def _cache_context(t: Transformer):
    """Transformer._context for a graph: positions, slots and lengths computed from the cache's tensors."""

    def context(b, s, cache: ExportCache, rows, device) -> AttnContext:
        page = cache.kv[0].shape[1]
        pos = cache.cache_lens.unsqueeze(1) + torch.arange(s, device=device)  # [B, S] int64
        angles = pos.float().unsqueeze(-1) * t.inv_freq  # [B, S, R/2]
        factor = t.args.rope_attention_factor
        ctx = AttnContext(torch.cos(angles) * factor, torch.sin(angles) * factor, fresh=False)
        ctx.cache, ctx.block_table = cache, cache.block_table
        ctx.slots = cache.block_table.long().gather(1, torch.div(pos, page, rounding_mode="floor")) * page + pos % page
        ctx.seq_lens = (cache.cache_lens + s).to(torch.int32)
        return ctx

    return context


@contextlib.contextmanager
def cache_context(t: Transformer):
    """While active, t computes positions, slots and lengths from an ExportCache's tensors (DecodeStep)."""
    saved = t.__dict__.get("_context")
    t._context = _cache_context(t)
    try:
        yield t
    finally:
        if saved is None:
            del t._context
        else:
            t._context = saved


class DecodeStep(nn.Module):
    """S new tokens per sequence over the paged latent cache (explicit inputs and outputs).

    Inputs: input_ids [B, S], cache_lens [B] int64 (tokens already cached), block_table [B, max_blocks]
    int32, then kv_cache.<i> [NB, P, C] and pe_cache.<i> [NB, P, R] per layer (then mtp_kv_cache.0,
    mtp_pe_cache.0). Outputs: logits [B, S, V], mtp_logits [B, S, V] (the MTP module on h with the greedy
    next token, the draft of speculative decoding), then every updated cache pool in input order.
    """

    def __init__(self, t: Transformer):
        super().__init__()
        self.t = t

    def forward(self, input_ids, cache_lens, block_table, *pools):
        t, n = self.t, self.t.args.n_layers
        main = ExportCache(list(pools[0:2 * n:2]), list(pools[1:2 * n:2]), cache_lens, block_table)
        h = t(input_ids, cache=main)
        logits = t.logits(h)
        outs = [logits]
        caches = [main]
        if t.args.n_mtp_layers:
            mtp = ExportCache([pools[2 * n]], [pools[2 * n + 1]], cache_lens, block_table)
            draft = t.ops.sample(logits.flatten(0, 1), 0.0, 1.0, None).view(logits.shape[:2])  # greedy next token
            outs.append(t.logits(t.mtp_forward(h, draft, cache=mtp)))
            caches.append(mtp)
        for c in caches:
            for kv, pe in zip(c.kv, c.pe):
                outs += [kv, pe]
        return tuple(outs)


def pool_names(t: Transformer) -> list[str]:
    names = []
    for i in range(t.args.n_layers):
        names += [f"kv_cache.{i}", f"pe_cache.{i}"]
    if t.args.n_mtp_layers:
        names += ["mtp_kv_cache.0", "mtp_pe_cache.0"]
    return names


def decode_model(t: Transformer, dtype: str = "fp32", block_size: int = 16) -> onnx.ModelProto:
    """One decode step (any S new tokens, cache_lens may be 0) with the latent cache as inputs and outputs."""
    a = t.args
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab_size, (1, 2), generator=g)
    n_blocks = 4
    pools = []
    for name in pool_names(t):
        width = a.kv_lora_rank if "kv_cache" in name else a.qk_rope_head_dim
        pools.append(torch.randn(n_blocks, block_size, width, generator=g).to(t.dtype))
    example = (ids, torch.tensor([3]), torch.tensor([[2, 0, 3, 1]], dtype=torch.int32), *pools)
    outs = ["logits"] + (["mtp_logits"] if a.n_mtp_layers else []) + [n + ".out" for n in pool_names(t)]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "cache_lens": {0: "batch"},
            "block_table": {0: "batch", 1: "max_blocks"}, "logits": {0: "batch", 1: "seq"}}
    if a.n_mtp_layers:
        axes["mtp_logits"] = {0: "batch", 1: "seq"}
    for n in pool_names(t):
        axes[n] = axes[n + ".out"] = {0: "n_blocks", 1: "block_size"}
    with cache_context(t):
        m = _trace(DecodeStep(t), example, ["input_ids", "cache_lens", "block_table", *pool_names(t)], outs, axes)
    return _finish(m, _metadata(t, dtype, "decode", t.ops.fp8))


def _metadata(t: Transformer, dtype: str, kind: str, fmt: Fp8Format | None) -> dict[str, str]:
    cfg = {k: v for k, v in asdict(t.args).items()}
    meta = {"deepport_version": deepport.__version__, "deepport_config": json.dumps(cfg, default=str),
            "deepport_dtype": dtype, "deepport_graph": kind, "deepport_source": getattr(t, "source", "")}
    if fmt is not None:
        meta["deepport_fp8_format"] = fmt.name
    return meta


@contextlib.contextmanager
def _quiet_stderr():
    """Hold back the exporter's C++ warnings (custom-domain nodes have no torch-side shape inference; the
    types come from the trace) unless the export fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _forget_absorbed(module: nn.Module) -> None:
    """Drop MLA's cached W_UK/W_UV so weight_dequant runs (and is traced or recorded) again."""
    for m in module.modules():
        if hasattr(m, "_absorbed"):
            m._absorbed = None


def record_calls(module: nn.Module, *args):
    """Run an export module (Prefill, DecodeStep) eagerly; returns (outputs, [(function, args, outputs)]) with
    one entry per deepport node of its export, in graph order (for cross_check.replay)."""
    _forget_absorbed(module)
    nodes.RECORD = []
    try:
        with torch.no_grad():
            out = module(*args)
        return out, nodes.RECORD
    finally:
        nodes.RECORD = None


def _trace(module: nn.Module, example: tuple, input_names, output_names, dynamic_axes) -> onnx.ModelProto:
    _forget_absorbed(module)  # cached absorbed weights would be traced as constants
    # Through a file, not memory: past protobuf's 2 GiB the exporter writes the weights as external data.
    with tempfile.TemporaryDirectory(prefix="deepport-onnx-") as tmp, warnings.catch_warnings(), \
            torch.no_grad(), _quiet_stderr():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "trace.onnx")
        torch.onnx.export(module, example, path, dynamo=False, opset_version=TORCH_OPSET,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes, custom_opsets={functions.DOMAIN: functions.DOMAIN_VERSION},
                          do_constant_folding=False)
        return onnx.load(path, load_external_data=True)


def _finish(m: onnx.ModelProto, meta: dict[str, str]) -> onnx.ModelProto:
    """Attach the deepport-domain functions, stamp opset 21 (blocked Q/DQ), record metadata."""
    for op in m.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = functions.OPSET
    m.ir_version = max(m.ir_version, 10)
    del m.functions[:]
    m.functions.extend(functions.functions())
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name, m.producer_version = "deepport", deepport.__version__
    return m


def prefill_model(t: Transformer, dtype: str = "fp32", seq_len: int = 4) -> onnx.ModelProto:
    """The prefill graph with dynamic batch and sequence length (S >= 2 when the model has an MTP module)."""
    g = torch.Generator().manual_seed(0)
    example = torch.randint(0, t.args.vocab_size, (1, max(seq_len, 2)), generator=g)
    outs = ["logits", "mtp_logits"] if t.args.n_mtp_layers else ["logits"]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    if t.args.n_mtp_layers:
        axes["mtp_logits"] = {0: "batch", 1: "seq_minus_1"}
    m = _trace(Prefill(t), (example,), ["input_ids"], outs, axes)
    return _finish(m, _metadata(t, dtype, "prefill", t.ops.fp8))


def weight_bytes(m: onnx.ModelProto) -> int:
    return sum(len(i.raw_data) for i in m.graph.initializer)


def save(m: onnx.ModelProto, output: str | Path, check: bool = True, external: bool | None = None) -> Path:
    """Write the model and run onnx.checker with full_check. external (default: weights over 1 GiB): weights
    go to `<output>.data` beside it (protobuf cannot hold more than 2 GiB in one file)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = weight_bytes(m) > EXTERNAL_DATA_BYTES
    if external:
        onnx.save_model(m, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(m, str(out))
    if check:
        try:
            onnx.checker.check_model(str(out), full_check=True)
        except onnx.checker.ValidationError as e:
            raise DeepportError(f"exported model {out} fails onnx.checker: {e}") from e
    return out
