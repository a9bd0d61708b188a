"""Checks on what a checkpoint holds, at load: finite weights, positive finite fp8 scales, shard paths that
stay inside the checkpoint directory. One cheap reduction per tensor; the exact count only on failure."""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from deepport.core.errors import CheckpointError

SKIP_HINT = "re-download or re-convert it, or load anyway with --no-check-weights (load(check_weights=False))"


def _nan_codes(t: torch.Tensor) -> torch.Tensor | None:
    """Mask of fp8 NaN codes (e4m3fn: S.1111.111; e4m3fnuz: 0x80), or None for other dtypes."""
    if t.dtype == torch.float8_e4m3fn:
        return (t.view(torch.uint8) & 0x7F) == 0x7F
    if t.dtype == torch.float8_e4m3fnuz:
        return t.view(torch.uint8) == 0x80
    if t.dtype == getattr(torch, "float8_e5m2", None):
        return (t.view(torch.uint8) & 0x7C) == 0x7C  # e5m2 has inf and NaN in the top exponent
    return None


def nonfinite_count(t: torch.Tensor) -> int:
    """How many values of `t` are NaN or inf (0 for integer tensors): one sum, and a full count only if it fails."""
    codes = _nan_codes(t)
    if codes is not None:
        return int(codes.sum())
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if torch.isfinite(t.sum(dtype=torch.float32)):
        return 0  # any NaN or inf would have made the sum non-finite
    return int((~torch.isfinite(t)).sum())  # the sum may also have overflowed on huge finite values


def check_tensor(name: str, t: torch.Tensor, scale: torch.Tensor | None) -> None:
    """CheckpointError when a weight holds NaN/inf or an fp8 block scale is not positive and finite."""
    bad = nonfinite_count(t)
    if bad:
        raise CheckpointError(f"tensor {name} holds {bad:,} non-finite values (NaN/inf) of {t.numel():,}; "
                              f"the checkpoint is corrupt: {SKIP_HINT}")
    if scale is not None:
        s = scale.float()
        bad = int((~torch.isfinite(s) | (s <= 0)).sum())
        if bad:
            worst = s[~torch.isfinite(s) | (s <= 0)][0].item()
            raise CheckpointError(f"fp8 scale {name}_scale_inv has {bad:,} block scales that are not positive and "
                                  f"finite (e.g. {worst}); every dequantised block would be wrong: {SKIP_HINT}")


def check_shard_path(index: Path, shard) -> None:
    """CheckpointError unless an index.json entry is a relative path inside the checkpoint directory."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index} maps a tensor to {shard!r}, not a shard file name; re-download the index")
    for pure in (PurePosixPath(shard), PureWindowsPath(shard)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise CheckpointError(f"{index} lists shard {shard!r} outside the checkpoint directory; shard paths must "
                                  f"be relative names inside {index.parent} (the index is broken or tampered with)")
