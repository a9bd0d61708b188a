"""The embedded default model and named presets, resolved to HF-format directories."""
from __future__ import annotations

import shutil
from pathlib import Path

from deepport.core import output_dir, settings
from deepport.core.checkpoint import random_tensors, save
from deepport.core.config import PRESETS, preset, to_hf_config
from deepport.core.errors import ConfigError

HERE = Path(__file__).parent
TINY_DIR = HERE / "tiny"
TOKENIZER = TINY_DIR / "tokenizer.json"
SEED = 1234
MATERIALISABLE = ("tiny", "tiny-b", "v3-200m")


def trained_default(fp8: bool = True) -> Path | None:
    """The trained embedded model shipped in the package, if present (see docs/models/tiny.md)."""
    for variant in (("fp8", "bf16") if fp8 else ("bf16", "fp8")):
        d = TINY_DIR / variant
        if (d / "config.json").is_file():
            return d
    return None


def materialise(name: str, fp8: bool, seed: int = SEED) -> Path:
    """Write preset `name` with deterministic random weights (seed) as an HF directory in the cache; reuse it."""
    args = preset(name)
    if name not in MATERIALISABLE:
        raise ConfigError(f"preset {name!r} is shapes only ({args.dim} wide); download the real checkpoint "
                          f"and pass its directory with --model")
    out = settings.cache_dir() / f"{name}-seed{seed}-{'fp8' if fp8 else 'bf16'}"
    if (out / "config.json").is_file():
        return out
    # One writer per entry (processes on one host queue on the lock; the others then reuse its files);
    # the entry appears by one rename, so a reader never sees it half written.
    with output_dir.file_lock(out.with_name(f".{out.name}.lock")):
        if (out / "config.json").is_file():
            return out
        legacy = out.with_name(out.name + ".tmp")  # what deepport <= 0.1.0 left when killed mid-write
        if legacy.is_dir():
            shutil.rmtree(legacy)
        with output_dir.staged_dir(out, force=True, what="preset cache entry") as tmp:
            save(random_tensors(args, seed, fp8=fp8), to_hf_config(args, fp8=fp8), tmp, tokenizer=TOKENIZER)
    return out


def resolve(model: str | Path | None, fp8: bool) -> Path:
    """A model argument (None: embedded default; a preset name; a directory) -> checkpoint directory."""
    if model is None:
        trained = trained_default(fp8)
        if trained is not None:
            return trained
        return materialise("tiny", fp8)
    if str(model) in PRESETS:
        return materialise(str(model), fp8)
    p = Path(model)
    if not p.is_dir():
        raise ConfigError(f"model {model!r} is neither a directory nor a preset; use a checkpoint directory "
                          f"or one of {', '.join(PRESETS)}")
    return p
