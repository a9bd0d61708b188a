"""`deepport convert`: rewrite a checkpoint's dtype shard by shard, into a temporary sibling renamed at the end.

Memory stays bounded by one output shard (`max_shard_bytes`) plus the tensors being converted: tensors are
read memory-mapped one input shard at a time, converted, and flushed to a numbered part file whenever the
current output shard is full. Part files get their Hugging Face names (`model-0000i-of-0000N.safetensors`
+ index, or `model.safetensors` when one shard suffices) once the count is known.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepport.core import output_dir, settings
from deepport.core.errors import CheckpointError

SHARD_BYTES = 4 << 30  # output shard size (Hugging Face's usual ~4-5 GB)


def _say(msg: str) -> None:
    if settings.progress_enabled():
        print(msg, file=sys.stderr, flush=True)


class ShardWriter:
    """Collect tensors into shards of at most `max_shard_bytes` (a bigger tensor gets a shard of its own)
    and write each shard as soon as it is full, so only one shard is ever held."""

    def __init__(self, out: Path, max_shard_bytes: int = SHARD_BYTES):
        self.out, self.max_shard_bytes = Path(out), max_shard_bytes
        self.parts: list[tuple[str, list[str]]] = []  # (part file, tensor names)
        self.cur: dict[str, torch.Tensor] = {}
        self.cur_bytes = self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.cur and self.cur_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.cur[name] = t.contiguous()
        self.cur_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.cur:
            return
        fname = f"part-{len(self.parts) + 1:05d}.safetensors"
        save_file(self.cur, str(self.out / fname), metadata={"format": "pt"})
        self.parts.append((fname, list(self.cur)))
        _say(f"convert: wrote shard {len(self.parts)} ({self.cur_bytes / 2**20:.1f} MiB, {len(self.cur)} tensors)")
        self.cur, self.cur_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush the last shard and give every part its final name (+ the index when sharded)."""
        self.flush()
        if not self.parts:
            raise CheckpointError(f"nothing to write to {self.out}: the source holds no tensors")
        n = len(self.parts)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (part, tensors), final in zip(self.parts, names):
            (self.out / part).rename(self.out / final)
            weight_map.update({t: final for t in tensors})
        if n > 1:
            (self.out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=1))
        return names


def convert(src: str | Path, dst: str | Path, dtype: str, fp8_format_name: str = "e4m3fn", *, force: bool = False,
            max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Rewrite a checkpoint as bf16 / fp32 (dequantising fp8) or fp8 (quantising; optionally e4m3fnuz, scales x2).

    dst must be new or empty (force: replaced as a whole); it appears only when the whole conversion
    succeeded. Peak memory: one output shard plus one input shard's tensors in flight."""
    from deepport.core.checkpoint import _convert, _fp8_pairs, hf_specs, read_config
    from deepport.core.config import to_hf_config
    from deepport.core.formats import fp8_format

    src = Path(src)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise CheckpointError(f"cannot convert to {dtype!r}; use bf16, fp32 or fp8")
    output_dir.check(dst, force=force, sources=(src,), what="convert output")
    args, cfg = read_config(src)
    specs = hf_specs(args)
    target_fp8 = fp8_format(fp8_format_name) if dtype == "fp8" else None
    new_cfg = dict(cfg)
    new_cfg.pop("quantization_config", None)
    if target_fp8 is not None:
        new_cfg["quantization_config"] = to_hf_config(args, fp8=True, fp8_format=target_fp8.name)["quantization_config"]
    new_cfg["torch_dtype"] = {"fp32": "float32"}.get(dtype, "bfloat16")
    with output_dir.staged_dir(dst, force=force, sources=(src,), what="convert output") as tmp:
        w = ShardWriter(tmp, max_shard_bytes)
        for name, t, scale in _fp8_pairs(src, what=f"converting {src.name}"):
            spec = specs.get(name)
            if spec is None:
                w.add(name, t)
                continue
            v, s = _convert(name, t, scale, spec, torch_dtype, target_fp8)
            del t, scale
            w.add(name, v)
            if s is not None:
                w.add(name + "_scale_inv", s)
        w.finish()
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2))
        for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (src / extra).is_file():
                (tmp / extra).write_bytes((src / extra).read_bytes())
    _say(f"convert: {dst} complete ({w.total_bytes / 2**20:.1f} MiB in {len(w.parts)} shard(s))")
    return Path(dst)
