"""The cpu backend's C kernels: built once per machine with the system C compiler, loaded through ctypes.

A kernel here replaces many torch calls by one where the calls cost more than the arithmetic: the embedded model's
MoE layer (~45 torch calls for ~1.5 MB of weights at batch 1; it also reads an FP8 checkpoint's expert codes, a
quarter of the bytes), the gate after its scores (selection and weights, ~14 calls), MLA decode (~20 calls), RMSNorm
with its residual add (5 calls, 25 norms a step), and linear layers of 1 MiB or more of an FP8 checkpoint (their
codes: memory-bound GEMVs read a quarter of the bytes) or of bf16 weights served as fp32 (the bf16 values: half the
bytes; an FP8 checkpoint's lm_head). A ctypes call costs a few us, so each kernel replaces five torch calls or more,
and each was kept on decode steps timed with and without it (docs/performance.md, "Eighth session" and "Ninth
session"). The sources (moe_experts.c, moe_route.c, mla_decode.c, rms_norm.c, simd.h) ship in the package; the first
use compiles them (`cc -O3 -march=native`, well under a second) into DEEPPORT_CACHE/native/, keyed by the sources,
the compiler and the CPU, so an upgrade or another machine rebuilds. Where torch runs on GNU OpenMP (its Linux
wheels) they are built with -fopenmp and split large work across torch's own threads (torch.set_num_threads,
`--threads`); elsewhere they run on the calling thread, and the ops then call them on one thread only. No compiler,
an unwritable cache or DEEPPORT_CPU_NATIVE=0: the torch paths run, a warning says why once a process (not for
DEEPPORT_CPU_NATIVE=0), and `status()` says it in the op sources (`Model.op_sources()`). torch.compile's Inductor
needs the same compiler.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from deepport.core import settings

# rows (tokens) up to which the cpu ops call these kernels: past it the sorted GEMMs win (embedded expert shapes:
# 24 tokens 505 vs 480-565 us, 64: 721 vs 1140; docs/performance.md "Eighth session")
MAX_TOKENS = 16

_HERE = Path(__file__).parent
_SOURCES = ("moe_experts.c", "moe_route.c", "mla_decode.c", "rms_norm.c")  # with simd.h: one library
_FLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11")  # gnu: a * b + c may fuse into an FMA (ISO C forbids it)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _arch_flags(cc: str) -> tuple[str, ...]:
    """-march=native where the compiler takes it (x86, recent ARM compilers), else -mcpu=native, else none."""
    for flag in ("-march=native", "-mcpu=native"):
        probe = subprocess.run([cc, flag, "-x", "c", "-fsyntax-only", "-"], input=b"int x;\n", capture_output=True)
        if probe.returncode == 0:
            return (flag,)
    return ()


def _openmp_flags(cc: str) -> tuple[str, ...]:
    """-fopenmp where torch runs on GNU OpenMP (Linux wheels: torch/lib/libgomp.so.1) and the compiler takes it:
    the library then needs libgomp.so.1, which the loader resolves to the copy torch has loaded, so the kernels'
    parallel loops run on torch's own threads, as many as torch.set_num_threads says. Elsewhere (another OpenMP
    runtime, or none): no flag, and the kernels run on the calling thread."""
    import torch

    info = torch.__config__.parallel_info()
    if platform.system() != "Linux" or "parallel backend: OpenMP" not in info or "GNU" not in _libgomp_of_torch():
        return ()
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run([cc, "-fopenmp", "-fPIC", "-shared", "-x", "c", "-", "-o", os.path.join(tmp, "p.so")],
                               input=b"int f(int n){int s=0;\n#pragma omp parallel for reduction(+:s)\n"
                                     b"for(int i=0;i<n;i++)s+=i;return s;}\n", capture_output=True)
    return ("-fopenmp",) if probe.returncode == 0 else ()


def _libgomp_of_torch() -> str:
    """'GNU' when torch's own library directory holds libgomp.so.1 (GNU OpenMP), else ''."""
    import torch

    return "GNU" if (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists() else ""


def _key(cc: str, flags: tuple[str, ...]) -> str:
    from deepport.backends.cpu import capability

    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    h = hashlib.sha256()
    for name in (*_SOURCES, "simd.h"):
        h.update((_HERE / name).read_bytes())
    for part in (cc, *version, *flags, platform.machine(), capability.model_name(), *sorted(capability.cpu_flags())):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _build() -> tuple[ctypes.CDLL | None, str]:
    if not settings.cpu_native():
        return None, "off (DEEPPORT_CPU_NATIVE=0)"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (install gcc or clang, or set CC)"
    flags = _arch_flags(cc) + _openmp_flags(cc) + _FLAGS
    out_dir = settings.cache_dir() / "native"
    lib = out_dir / f"kernels-{_key(cc, flags)}.so"
    if not lib.exists():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # built aside, renamed: concurrent builds are safe
        except OSError as e:
            return None, (f"cannot write the build to {out_dir} ({e.strerror}; set DEEPPORT_CACHE to a writable "
                          f"directory)")
        os.close(fd)
        run = subprocess.run([cc, *flags, "-o", tmp, *(str(_HERE / n) for n in _SOURCES), "-lm"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            os.unlink(tmp)
            first = (run.stderr.strip().splitlines() or ["no output"])[0]
            return None, f"C build failed ({Path(cc).name}: {first})"
        os.replace(tmp, lib)
    try:
        dll = ctypes.CDLL(str(lib))
    except OSError as e:
        return None, f"could not load {lib.name}: {e}"
    for name, ints, pointers in (("deepport_moe_experts_f32", 5, 7), ("deepport_moe_experts_e4m3", 5, 10),
                                 ("deepport_linear_e4m3", 3, 4)):
        fn = getattr(dll, name)
        fn.argtypes = [ctypes.c_int64] * ints + [ctypes.c_void_p] * pointers
        fn.restype = ctypes.c_int
    dll.deepport_set_threads.argtypes = [ctypes.c_int64]
    dll.deepport_set_threads.restype = ctypes.c_int
    dll.deepport_moe_gate_tail.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2 + \
        [ctypes.c_float, ctypes.c_int64] + [ctypes.c_void_p] * 2
    dll.deepport_moe_gate_tail.restype = ctypes.c_int
    dll.deepport_rms_norm.argtypes = [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_float] + \
        [ctypes.c_void_p] * 2
    dll.deepport_rms_norm.restype = ctypes.c_int
    dll.deepport_linear_bf16.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3
    dll.deepport_linear_bf16.restype = ctypes.c_int
    dll.deepport_mla_decode_f32.argtypes = [ctypes.c_int64] * 8 + [ctypes.c_void_p] * 6 + [ctypes.c_float] + \
        [ctypes.c_void_p] * 2
    dll.deepport_mla_decode_f32.restype = ctypes.c_int
    return dll, f"C ({Path(cc).name} {' '.join(f for f in flags if f.startswith(('-march', '-mcpu', '-fopenmp')))})"


@functools.lru_cache(maxsize=1)
def _loaded() -> tuple[ctypes.CDLL | None, str]:
    lib, how = _build()
    if lib is None and settings.cpu_native():  # said once a process; DEEPPORT_CPU_NATIVE=0 was the user's choice
        from deepport.core import registry

        registry.warn(f"cpu backend: its C kernels are not in use: {how}; the torch paths run instead (slower "
                      f"decode; DEEPPORT_CPU_NATIVE=0 silences this)")
    return lib, how


_TOLD = [None, 0]  # the library last told a thread count, and that count


def _lib() -> ctypes.CDLL:
    """The loaded library, told torch's thread count first whenever it changed (the parallel loops use it, from
    whichever Python thread calls; see simd.h). The callers checked available()."""
    import torch

    lib, n = _loaded()[0], torch.get_num_threads()
    if lib is not _TOLD[0] or n != _TOLD[1]:
        lib.deepport_set_threads(n)
        _TOLD[:] = lib, n
    return lib


def status() -> str:
    """What runs the C kernels here: `C (cc -march=native)`, or why they do not run."""
    return _loaded()[1]


def available() -> bool:
    return _loaded()[0] is not None


def parallel() -> bool:
    """The kernels split large work across torch's threads (an OpenMP build, see _openmp_flags)."""
    return available() and "-fopenmp" in _loaded()[1]


def threads_ok() -> bool:
    """The kernels may run where torch has this many threads: one, or any number in a parallel build (a serial
    build on several threads would leave the others idle where MKL splits its GEMMs)."""
    import torch

    return torch.get_num_threads() == 1 or parallel()


def _check(rc: int, bad_input: str, buffers: str) -> None:
    """A kernel's return code: 0 fine, -1 bad input (ContractError: bad_input), -2 out of memory."""
    from deepport.core.errors import ContractError

    if rc == -1:
        raise ContractError(bad_input)
    if rc != 0:
        raise MemoryError(f"the C kernel could not allocate {buffers}")


def moe_experts(x, topk_weights, topk_ids, w1, w2, w3, codes=None):
    """The routed experts through the C kernel: fp32 [M, D]. w1, w2, w3: fp32 [E, I, D], [E, D, I], [E, I, D];
    codes: None, or (w1, w2, w3) as Fp8Weight (e4m3fn codes, 128x128 blocks) holding the same values, which the
    kernel then reads instead (a quarter of the bytes). The caller checks eligibility (fp32 tensors on the CPU,
    contiguous weights, nothing that needs grad, not tracing) and that the kernel is available."""
    import torch

    m, d = x.shape
    e, inter, _ = w1.shape
    ids = topk_ids if topk_ids.dtype == torch.int64 else topk_ids.long()
    wts = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    x, ids, wts = x.contiguous(), ids.contiguous(), wts.contiguous()
    y = torch.empty(m, d, dtype=torch.float32)
    lib = _lib()
    head = (m, d, inter, ids.shape[1], e, x.data_ptr(), ids.data_ptr(), wts.data_ptr())
    if codes is None:
        rc = lib.deepport_moe_experts_f32(*head, w1.data_ptr(), w3.data_ptr(), w2.data_ptr(), y.data_ptr())
    else:
        c1, c2, c3 = codes
        rc = lib.deepport_moe_experts_e4m3(*head, c1.weight.data_ptr(), c1.scale_inv.data_ptr(), c3.weight.data_ptr(),
                                           c3.scale_inv.data_ptr(), c2.weight.data_ptr(), c2.scale_inv.data_ptr(),
                                           y.data_ptr())
    _check(rc, f"moe_experts: topk_ids holds an expert id >= {e} (the number of experts); ids must be in [0, {e}) "
               f"or negative (no expert)", f"moe_experts: its buffers ({m} tokens, {e} experts)")
    return y


ROUTE_MAX_EXPERTS = 1024  # moe_route.c's per-token buffers


def moe_gate_tail(scores, bias, n_groups: int, topk_groups: int, topk: int, route_scale: float, norm: bool):
    """(weights [M, topk] fp32, ids [M, topk] int64) from sigmoid scores [M, E] and the correction bias [E] through
    moe_route.c (bias add, selection, weights) in one call; the caller checks the contract
    (core/preconditions.moe_gate), E <= ROUTE_MAX_EXPERTS, fp32 CPU tensors."""
    import torch

    s, b = scores.contiguous(), bias.contiguous()
    m, e = s.shape
    ids = torch.empty(m, topk, dtype=torch.int64)
    w = torch.empty(m, topk, dtype=torch.float32)
    _lib().deepport_moe_gate_tail(m, e, n_groups, topk_groups, topk, s.data_ptr(), b.data_ptr(), route_scale,
                                  int(norm), ids.data_ptr(), w.data_ptr())
    return w, ids


def mla_decode(q_latent, q_pe, kv_cache, pe_cache, block_table, seq_lens, scale):
    """MLA decode through the C kernel (mla_decode.c): fp32 [B, S, H, C], heads-first in memory ([H, B, S, C]
    permuted: what the batched product over heads after it reads without a copy). q_latent and q_pe are read in
    place where their last dim is contiguous (the heads-first product before it, rope's split), else copied once.
    The caller checks the shapes and the lengths (S <= L <= blocks * P, core/preconditions.py) and eligibility
    (fp32 CPU tensors, no grad, not tracing)."""
    import torch

    b, s, h, c = q_latent.shape
    nb, p, _ = kv_cache.shape
    ql = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    qp = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    table = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
    lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32)
    table, lens = table.contiguous(), lens.contiguous()
    out = torch.empty(h, b, s, c, dtype=torch.float32).permute(1, 2, 0, 3)
    strides = (ctypes.c_int64 * 9)(*ql.stride()[:3], *qp.stride()[:3], *out.stride()[:3])
    rc = _lib().deepport_mla_decode_f32(b, s, h, c, q_pe.shape[-1], nb, p, table.shape[1], ql.data_ptr(),
                                        qp.data_ptr(), kv_cache.data_ptr(), pe_cache.data_ptr(),
                                        table.data_ptr(), lens.data_ptr(), scale, out.data_ptr(), strides)
    _check(rc, f"mla_decode: block_table holds a block id outside [0, {nb}) among the blocks in use; the cache's "
               f"block table is corrupt", f"mla_decode: its scores ({b} rows)")
    return out


def linear_e4m3(x, codes):
    """x [..., K] (fp32) times the transpose of the weight `codes` holds (Fp8Weight [N, K], 128x128 blocks):
    fp32 [..., N], reading the codes. The caller checks eligibility (fp32 CPU x, no grad, not tracing)."""
    return _linear(x, codes.weight.shape[0], lambda lib, m, n, k, xp, yp: lib.deepport_linear_e4m3(
        m, n, k, xp, codes.weight.data_ptr(), codes.scale_inv.data_ptr(), yp))


def linear_bf16(x, w16):
    """x [..., K] (fp32) times the transpose of w16 (bf16 [N, K], the exact values of an fp32 weight): fp32 [..., N],
    reading the bf16 values (half the bytes). The caller checks eligibility (fp32 CPU x, no grad, not tracing)."""
    return _linear(x, w16.shape[0], lambda lib, m, n, k, xp, yp: lib.deepport_linear_bf16(m, n, k, xp,
                                                                                         w16.data_ptr(), yp))


def _linear(x, n: int, call):
    import torch

    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    call(_lib(), x2.shape[0], n, k, x2.data_ptr(), y.data_ptr())
    return y.view(*x.shape[:-1], n)


def rms_norm(x, weight, eps: float, residual=None):
    """RMSNorm of fp32 x [..., D] through the C kernel (rms_norm.c): y, or (y, x + residual) with a residual, as the
    rms_norm contract. The caller checks eligibility (fp32 CPU tensors, matching shapes, no grad, not tracing)."""
    import torch

    d, fn = x.shape[-1], _lib().deepport_rms_norm
    xc, w = x.contiguous(), weight.contiguous()
    y = torch.empty_like(xc)  # (torch.empty of a torch.Size costs a microsecond more: 25 norms a step)
    if residual is None:
        fn(xc.numel() // d, d, xc.data_ptr(), None, w.data_ptr(), eps, y.data_ptr(), None)
        return y
    rc, r = residual.contiguous(), torch.empty_like(xc)
    fn(xc.numel() // d, d, xc.data_ptr(), rc.data_ptr(), w.data_ptr(), eps, y.data_ptr(), r.data_ptr())
    return y, r
