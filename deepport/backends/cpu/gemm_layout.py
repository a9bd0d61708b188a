"""How a decode-sized GEMM on this CPU should read its weight: torch's [N, K], a K-major copy, or through oneDNN.

A decode GEMM (M = 1..16 rows) reads its weight from memory, and how fast it streams depends on the CPU, the
shape and M, in ways no fixed rule captures. Measured with weights read from memory (docs/performance.md): on a
Zen 4 EPYC an M = 1 GEMV with K = 512, N = 1024 streams MKL's K-major copy 1.9x faster than [N, K], while
K = 1024, N = 512 streams [N, K] 1.6x faster; at M = 8 oneDNN's fp32 matmul streams the largest weights 1.2-2x
faster than MKL in either layout; on a Xeon the 2-row GEMMs of the same weights streamed [N, K] faster. So the
cpu backend measures each (rows bucket, K, N, dtype) once on first use, with weights that do not fit in the
caches, and keeps the rates in memory and in <DEEPPORT_CACHE>/cpu-gemm-layout.json, keyed by this machine (CPU
model, ISA, torch version, threads): a later process measures nothing.

The choice: [N, K] (as stored, no RAM) unless another way is >= 3% faster. oneDNN reads [N, K] as stored (no
copy) but is offered only to dense weights (`linear`); the MoE's per-expert views choose between [N, K] and K-major.
DEEPPORT_CPU_GEMM_LAYOUT=kmajor|nk|onednn fixes the choice for every GEMM (nk: no K-major copies, half the RAM for
weights; onednn: dense weights through oneDNN, experts as nk; no measuring). Not measured: prefill-sized GEMMs
(M > 16: compute-bound, always the K-major copy, 1.5-3x faster than [N, K]) and weights under 1 MiB (the
embedded model's: K-major, which is as fast or a few percent faster there, and what its prefill copies anyway).
"""
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deepport.core import settings

TUNED_MAX_ROWS = 16  # above it a GEMM is compute-bound: K-major, no measuring
TUNED_MIN_BYTES = 1 << 20  # smaller weights: K-major, no measuring
LAYOUTS = ("nk", "kmajor", "onednn")
_BUCKETS = (1, 2, 4, 8, 16)
_MIN_GAIN = 1.03  # [N, K] unless another way is measurably faster (a K-major copy costs RAM)
_STREAM_BYTES = 64 << 20  # at least this much weight is streamed per measurement (more than the L3 twice)
_MAX_WEIGHT_BYTES = 256 << 20  # bigger weights are measured on their first N rows (same K): as slow per byte

_rates: dict[str, dict[str, float]] = {}  # "<rows bucket>x<K>x<N>:<dtype>" -> layout -> GB/s (the cache file)
_memo: dict[tuple, str] = {}  # (m, k, n, dtype, dense) -> the layout: one dict lookup per GEMM on the hot path
_loaded = [False]
_announced = [False]
_save_failed = [False]


def bucket(m: int) -> int:
    """The measured row count a GEMM of m rows is decided by (the next of 1, 2, 4, 8, 16)."""
    for b in _BUCKETS:
        if m <= b:
            return b
    return m


def layout(m: int, k: int, n: int, dtype: torch.dtype, dense: bool = True) -> str:
    """How a GEMM [m, k] x [k, n] should read its weight: "nk", "kmajor" or (dense weights only) "onednn"."""
    hit = _memo.get((m, k, n, dtype, dense))
    if hit is None:
        hit = _memo[(m, k, n, dtype, dense)] = _decide(m, k, n, dtype, dense)
    return hit


def kmajor_faster(m: int, k: int, n: int, dtype: torch.dtype) -> bool:
    """For per-expert views: True when the K-major copy beats [N, K] (oneDNN is not offered there)."""
    return layout(m, k, n, dtype, dense=False) == "kmajor"


def _decide(m: int, k: int, n: int, dtype: torch.dtype, dense: bool) -> str:
    forced = settings.cpu_gemm_layout()
    if forced != "tuned":
        return forced if dense or forced != "onednn" else "nk"
    if m > TUNED_MAX_ROWS or k * n * torch.empty((), dtype=dtype).element_size() < TUNED_MIN_BYTES:
        return "kmajor"
    key = f"{bucket(m)}x{k}x{n}:{str(dtype).removeprefix('torch.')}"
    if key not in _rates and not _loaded[0]:
        _load()
    if key not in _rates:
        _rates[key] = measure(bucket(m), k, n, dtype)
        _save()
    rates = _rates[key]
    best = "nk"
    for name in ("kmajor", "onednn") if dense else ("kmajor",):
        if rates.get(name, 0.0) > max(rates.get(best, 0.0), rates.get("nk", 0.0) * _MIN_GAIN):
            best = name
    return best


def machine() -> str:
    """What the measurements are valid for: CPU model, torch's ISA level, torch version, threads."""
    from deepport.backends.cpu import capability

    return (f"{capability.model_name()} | {capability.isa()} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads")


def cache_path() -> Path:
    return settings.cache_dir() / "cpu-gemm-layout.json"


def _valid(entry) -> bool:
    return (isinstance(entry, dict) and "nk" in entry and set(entry) <= set(LAYOUTS)
            and all(isinstance(v, (int, float)) and v >= 0 for v in entry.values()))


def _load() -> None:
    _loaded[0] = True
    try:
        data = json.loads(cache_path().read_text())
        entries = data.get(machine(), {}) if isinstance(data, dict) else {}
        _rates.update({k: v for k, v in entries.items() if _valid(v) and k not in _rates})
    except (OSError, ValueError, AttributeError):
        pass  # no cache yet, or unreadable: measure again


def _save() -> None:
    """Merge this process's rates into the cache file, under a lock (ranks and concurrent runs share it), written
    atomically. A failure costs only measuring again in the next process, and is said once."""
    from deepport.core import output_dir

    path = cache_path()
    try:
        with output_dir.file_lock(path.with_name(path.name + ".lock")):
            try:
                data = json.loads(path.read_text())
                data = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                data = {}
            mine = data.get(machine())
            mine = {k: v for k, v in mine.items() if _valid(v)} if isinstance(mine, dict) else {}
            mine.update(_rates)
            data[machine()] = mine
            output_dir.write_text(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError as e:
        if not _save_failed[0]:
            _save_failed[0] = True
            print(f"deepport: could not keep the measured GEMM layouts in {path} ({e}); the next run measures "
                  f"them again (set DEEPPORT_CACHE to a writable directory)", file=sys.stderr, flush=True)


def onednn_linear(x, w):
    """x [M, K] @ w[N, K]^T through oneDNN's fp32/bf16 matmul (w read as stored)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _onednn_works(x, w) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        tol = 1e-3 if x.dtype == torch.float32 else 5e-2  # bf16: two roundings apart
        return torch.allclose(onednn_linear(x, w[0]).float(), F.linear(x, w[0]).float(), rtol=tol, atol=tol)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def measure(m: int, k: int, n: int, dtype: torch.dtype) -> dict[str, float]:
    """GB/s of [m, k] x W from memory, W read as [N, K], as a K-major copy and (where it works) through
    oneDNN: alternating, best of 3 passes each over enough copies of W that every read misses the caches."""
    if not _announced[0]:
        _announced[0] = True
        print(f"deepport: measuring how this CPU's decode GEMMs read their weights fastest (once per shape; kept "
              f"in {cache_path()})", file=sys.stderr, flush=True)
    esize = torch.empty((), dtype=dtype).element_size()
    n = max(1, min(n, _MAX_WEIGHT_BYTES // max(1, k * esize)))
    per = k * n * esize
    copies = max(2, math.ceil(_STREAM_BYTES / per))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w_nk = torch.randn(1, n, k, generator=g).to(dtype).expand(copies, n, k).contiguous()
    w_km = w_nk.transpose(1, 2).contiguous()
    views_nk, views_km = w_nk.unbind(0), w_km.unbind(0)

    def nk():
        for w in views_nk:
            F.linear(x, w)

    def kmajor():
        for w in views_km:
            torch.mm(x, w)

    def onednn():
        for w in views_nk:
            onednn_linear(x, w)

    ways = {"nk": nk, "kmajor": kmajor}
    if _onednn_works(x, w_nk):
        ways["onednn"] = onednn
    best = dict.fromkeys(ways, float("inf"))
    for f in ways.values():
        f()  # touch the pages
    for _ in range(3):
        for name, f in ways.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: round(per * copies / t / 1e9, 2) for name, t in best.items()}


def reset() -> None:
    """Forget the in-memory choices (tests, a changed DEEPPORT_CPU_GEMM_LAYOUT; the next call reads the cache
    file again)."""
    _rates.clear()
    _memo.clear()
    _loaded[0] = False
