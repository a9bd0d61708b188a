"""Compile targets: the fp8 dtype policy per architecture and the CompileSpec a kernel module exposes."""
from __future__ import annotations

from dataclasses import dataclass, field

from deepport.core.errors import BackendError

TRITON_FP8 = {"e4m3fn": "fp8e4nv", "e4m3fnuz": "fp8e4b8"}  # torch float8 name -> Triton type name


def fp8_format_for(backend: str, arch) -> str:
    """The fp8 format a device computes in: e4m3fn on NVIDIA sm89+ and AMD gfx950, e4m3fnuz on gfx942.

    `backend` is Triton's target backend ("cuda" or "hip"); `arch` is the compute capability (int 90 or
    tuple (9, 0)) for cuda, the gcnArchName (e.g. "gfx942:sramecc+:xnack-") for hip.
    """
    if backend == "cuda":
        cc = arch[0] * 10 + arch[1] if isinstance(arch, tuple) else int(arch)
        if cc >= 89:
            return "e4m3fn"
        raise BackendError(f"NVIDIA sm{cc} has no fp8 tensor cores (fp8 needs sm89+: Ada, Hopper, Blackwell); "
                           f"use --dtype bf16")
    if backend == "hip":
        name = str(arch)
        if "gfx94" in name:
            return "e4m3fnuz"
        if "gfx95" in name:
            return "e4m3fn"
        raise BackendError(f"AMD {name.split(':')[0]} has no fp8 matrix cores (fp8 needs gfx942 or gfx950); "
                           f"use --dtype bf16")
    raise BackendError(f"unknown Triton target backend {backend!r}; expected 'cuda' or 'hip'")


def check_fp8_format(backend: str, arch, fmt: str) -> None:
    """Refuse an fp8 format the device cannot compute in, before anything is compiled or launched."""
    want = fp8_format_for(backend, arch)
    if fmt != want:
        where = f"sm{arch}" if backend == "cuda" else str(arch).split(":")[0]
        fix = ("convert the checkpoint with deepport.core.formats.fn_to_fnuz (scales x2)" if want == "e4m3fnuz"
               else f"quantise to {want}")
        raise BackendError(f"fp8 format {fmt} is not supported on {backend} {where}: it computes in {want}; {fix}")


@dataclass(frozen=True)
class CompileSpec:
    """One ahead-of-time compile of a kernel for a target, and what its assembly must contain."""

    name: str  # e.g. "fp8_gemm[e4m3fn]"
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*fp8e4nv", "*bf16", "*fp32", "i32", "fp32", "constexpr")
    constexprs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # num_warps, num_stages, waves_per_eu, matrix_instr_nonkdim, kpack
    expect: tuple = ()  # regexes that must match the PTX (cuda) or AMDGCN (hip) text
    forbid: tuple = ()  # regexes that must not match it (e.g. tf32 MMA in an fp32 router)


def target_fp8(target) -> str:
    """The fp8 format name a GPUTarget computes in (policy above)."""
    return fp8_format_for(target.backend, target.arch)


def asm_kind(target) -> str:
    return "ptx" if target.backend == "cuda" else "amdgcn"
