"""Which weight layout streams faster in a decode-sized GEMM on this CPU: torch's [N, K] or a K-major copy.

A decode GEMM (M = 1..16 rows) reads its weight from memory, and how fast MKL streams it depends on the CPU,
the shape and M, in ways no fixed rule captures. Measured with weights read from memory (docs/performance.md):
on a Zen 4 EPYC an M = 1 GEMV with K = 512, N = 1024 streams the K-major copy 1.9x faster than [N, K], while
K = 1024, N = 512 streams [N, K] 1.6x faster, and at M = 8 [N, K] wins on every weight over 2 MB; on a Xeon the
2-row GEMMs of the same weights streamed [N, K] faster. So the cpu backend measures each (rows bucket, K, N,
dtype) once on first use, with weights that do not fit in the caches, and keeps the answer in memory and in
<DEEPPORT_CACHE>/cpu-gemm-layout.json, keyed by this machine (CPU model, ISA, torch version, threads).
DEEPPORT_CPU_GEMM_LAYOUT=kmajor|nk fixes the choice for every GEMM (nk: no K-major copies, half the RAM for
weights; no measuring). Not measured: prefill-sized GEMMs
(M > 16: compute-bound, always the K-major copy, 1.5-3x faster than [N, K]) and weights under 1 MiB (the
embedded model's: K-major, which is as fast or a few percent faster there, and what its prefill copies anyway).
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deepport.core import settings

TUNED_MAX_ROWS = 16  # above it a GEMM is compute-bound: K-major, no measuring
TUNED_MIN_BYTES = 1 << 20  # smaller weights: K-major, no measuring
_BUCKETS = (1, 2, 4, 8, 16)
_MIN_GAIN = 1.03  # the K-major copy costs RAM: take it only when it is measurably faster
_STREAM_BYTES = 64 << 20  # at least this much weight is streamed per measurement (more than the L3 twice)
_MAX_WEIGHT_BYTES = 256 << 20  # bigger weights are measured on their first N rows (same K): as slow per byte

_choices: dict[str, bool] = {}  # "<rows bucket>x<K>x<N>:<dtype>" -> K-major is faster (what the cache file holds)
_memo: dict[tuple, bool] = {}  # (m, k, n, dtype) -> the decision: one dict lookup per GEMM on the hot path
_loaded = [False]
_announced = [False]


def bucket(m: int) -> int:
    """The measured row count a GEMM of m rows is decided by (the next of 1, 2, 4, 8, 16)."""
    for b in _BUCKETS:
        if m <= b:
            return b
    return m


def kmajor_faster(m: int, k: int, n: int, dtype: torch.dtype) -> bool:
    """True when a GEMM [m, k] x [k, n] should read the K-major copy of its weight, False for [N, K]."""
    hit = _memo.get((m, k, n, dtype))
    if hit is None:
        hit = _memo[(m, k, n, dtype)] = _decide(m, k, n, dtype)
    return hit


def _decide(m: int, k: int, n: int, dtype: torch.dtype) -> bool:
    forced = settings.cpu_gemm_layout()
    if forced != "tuned":
        return forced == "kmajor"
    if m > TUNED_MAX_ROWS:
        return True
    if k * n * torch.empty((), dtype=dtype).element_size() < TUNED_MIN_BYTES:
        return True
    key = f"{bucket(m)}x{k}x{n}:{str(dtype).removeprefix('torch.')}"
    if key not in _choices and not _loaded[0]:
        _load()
    if key not in _choices:
        _choices[key] = measure(bucket(m), k, n, dtype)
        _save()
    return _choices[key]


def machine() -> str:
    """What the measurements are valid for: CPU model, torch's ISA level, torch version, threads."""
    from deepport.backends.cpu import capability

    return (f"{capability.model_name()} | {capability.isa()} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads")


def cache_path() -> Path:
    return settings.cache_dir() / "cpu-gemm-layout.json"


def _load() -> None:
    _loaded[0] = True
    try:
        data = json.loads(cache_path().read_text())
        entries = data.get(machine(), {}) if isinstance(data, dict) else {}
        _choices.update({k: v for k, v in entries.items() if isinstance(v, bool) and k not in _choices})
    except (OSError, ValueError):
        pass  # no cache yet, or unreadable: measure again


def _save() -> None:
    """Merge this process's choices into the cache file (atomic replace; a failure costs only re-measuring)."""
    path = cache_path()
    try:
        try:
            data = json.loads(path.read_text())
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(machine(), {}).update(_choices)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def measure(m: int, k: int, n: int, dtype: torch.dtype) -> bool:
    """Time [m, k] x W from memory with W as [N, K] and as K-major, alternating, best of 3 passes each over
    enough copies of W that every read misses the caches. True when K-major is >= 3% faster."""
    if not _announced[0]:
        _announced[0] = True
        print(f"deepport: measuring the faster weight layout for this CPU's decode GEMMs (once per shape; kept in "
              f"{cache_path()})", file=sys.stderr, flush=True)
    esize = torch.empty((), dtype=dtype).element_size()
    n = max(1, min(n, _MAX_WEIGHT_BYTES // max(1, k * esize)))
    per = k * n * esize
    copies = max(2, math.ceil(_STREAM_BYTES / per))
    x = torch.ones(m, k, dtype=dtype)
    w_nk = torch.ones(copies, n, k, dtype=dtype)
    w_km = torch.ones(copies, k, n, dtype=dtype)
    views_nk, views_km = w_nk.unbind(0), w_km.unbind(0)

    def nk():
        for w in views_nk:
            F.linear(x, w)

    def km():
        for w in views_km:
            torch.mm(x, w)

    best = {nk: float("inf"), km: float("inf")}
    for f in (nk, km):
        f()  # touch the pages
    for _ in range(3):
        for f in (nk, km):
            t = time.perf_counter()
            f()
            best[f] = min(best[f], time.perf_counter() - t)
    return best[nk] > best[km] * _MIN_GAIN


def reset() -> None:
    """Forget the in-memory choices (tests, a changed DEEPPORT_CPU_GEMM_LAYOUT; the next call reads the cache
    file again)."""
    _choices.clear()
    _memo.clear()
    _loaded[0] = False
