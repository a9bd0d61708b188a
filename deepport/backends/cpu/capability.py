"""What this CPU computes natively: its model name, torch's vector ISA, and whether bf16 arithmetic is native.

The compute-dtype rule (measured, docs/performance.md "cpu backend"): `cpu` computes in fp32 by default on
every CPU. Where bf16 is emulated (AVX2 EPYC) a bf16 [1,7168]x[7168,2048] linear is 4x slower than fp32.
Where it is native (AVX512-BF16 + AMX Xeon, one thread) bf16 GEMMs with M >= 8 rows are ~3x faster, but
decode's M = 1 GEMVs are not faster at all (1.0x) and the bf16<->fp32 conversions around norms, rope,
routing and attention make whole-model decode slower (embedded model: 0.6x). `--dtype bf16` stays available
(prefill-heavy or batched work on AMX); `deepport backends` shows whether bf16 is native here.
"""
from __future__ import annotations

import functools
import platform


def _cpuinfo(keys: tuple[str, ...]) -> str | None:
    """The first non-empty value in /proc/cpuinfo under one of `keys` (lower case); None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in keys and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """Feature flags of the first CPU in /proc/cpuinfo (x86 `flags`, ARM `Features`); empty elsewhere."""
    return frozenset((_cpuinfo(("flags", "features")) or "").split())


@functools.lru_cache(maxsize=1)
def model_name() -> str:
    return (_cpuinfo(("model name", "cpu model", "hardware")) or platform.processor() or platform.machine()
            or "unknown CPU")


def isa() -> str:
    """torch's dispatch level for this CPU (AVX2, AVX512, SVE256, DEFAULT, ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def native_bf16() -> bool:
    """True where bf16 dot products are native: AVX512-BF16 / AMX on x86, the bf16 extension on ARM."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags) or (platform.machine() in ("aarch64", "arm64") and "bf16" in flags)


def compute_dtype() -> str:
    """The dtype `cpu` computes in by default: fp32 (see the module docstring for the measurements)."""
    return "fp32"


def describe() -> str:
    """`<model name>, <ISA>, bf16 native|emulated` for the evidence label and `deepport backends`."""
    return f"{model_name()}, {isa()}, bf16 {'native' if native_bf16() else 'emulated'}"
