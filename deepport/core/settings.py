"""The one place DEEPPORT_* environment variables are read."""
import os
from pathlib import Path


def backend_name() -> str | None:
    """DEEPPORT_BACKEND: backend chosen when no --backend is given."""
    return os.environ.get("DEEPPORT_BACKEND") or None


def plugins_autoload() -> bool:
    """DEEPPORT_PLUGINS_AUTOLOAD=0 turns off entry-point discovery of plugin backends."""
    return os.environ.get("DEEPPORT_PLUGINS_AUTOLOAD", "1") not in ("0", "false", "no")


def device_override() -> str | None:
    """DEEPPORT_DEVICE: run a backend on another torch device (e.g. cpu under TRITON_INTERPRET=1)."""
    value = os.environ.get("DEEPPORT_DEVICE") or None
    if value is not None:
        import torch

        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            from deepport.core.errors import ConfigError

            raise ConfigError(f"DEEPPORT_DEVICE={value!r} is not a torch device; use e.g. cpu, cuda or cuda:1, "
                              f"or unset it") from None
    return value


def cache_dir() -> Path:
    """DEEPPORT_CACHE: where generated preset checkpoints are materialised."""
    root = Path(os.environ.get("DEEPPORT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deepport"))
    if root.exists() and not root.is_dir():
        from deepport.core.errors import ConfigError

        raise ConfigError(f"DEEPPORT_CACHE={str(root)!r} is a file, not a directory; point it at a directory "
                          f"(it is created if missing) or unset it")
    return root


def progress_enabled() -> bool:
    """DEEPPORT_PROGRESS=0 silences progress bars."""
    return os.environ.get("DEEPPORT_PROGRESS", "1") not in ("0", "false", "no")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1 (Triton's own variable) means Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "", "false")


def interpret_fp8_format() -> str | None:
    """DEEPPORT_FP8_FORMAT: fp8 format a Triton backend uses under the interpreter (rocm: e4m3fnuz or e4m3fn)."""
    return os.environ.get("DEEPPORT_FP8_FORMAT") or None


def check_finite() -> bool:
    """DEEPPORT_CHECK_FINITE=1: every bound op checks its outputs for NaN/inf (names the first op that makes them)."""
    return os.environ.get("DEEPPORT_CHECK_FINITE", "0") not in ("0", "", "false", "no")


def compile_asserts() -> bool:
    """DEEPPORT_COMPILE_ASSERTS=1: Inductor's per-call size/stride/alignment checks stay on in compiled steps."""
    return os.environ.get("DEEPPORT_COMPILE_ASSERTS", "0") not in ("0", "", "false", "no")


def compile_guards() -> bool:
    """DEEPPORT_COMPILE_GUARDS=1: a compiled step evaluates every Dynamo guard on every call (default: only the
    guards that tell its graphs apart, once a shape has run)."""
    return os.environ.get("DEEPPORT_COMPILE_GUARDS", "0") not in ("0", "", "false", "no")


def probe_timeout_s() -> float:
    """DEEPPORT_PROBE_TIMEOUT: seconds a backend's probe may take before it counts as unavailable (default 10)."""
    raw = os.environ.get("DEEPPORT_PROBE_TIMEOUT") or "10"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        from deepport.core.errors import ConfigError

        raise ConfigError(f"DEEPPORT_PROBE_TIMEOUT={raw!r} is not a positive number of seconds; unset it or use e.g. 10")
    return value


def cpu_gemm_layout() -> str:
    """DEEPPORT_CPU_GEMM_LAYOUT: how the cpu backend reads weights in GEMMs: tuned (default: measured once per
    shape on this machine), kmajor (always a K-major copy), nk (always torch's [N, K]) or onednn (dense weights
    through oneDNN, experts [N, K])."""
    value = (os.environ.get("DEEPPORT_CPU_GEMM_LAYOUT") or "tuned").lower()
    if value not in ("tuned", "kmajor", "nk", "onednn"):
        from deepport.core.errors import ConfigError

        raise ConfigError(f"DEEPPORT_CPU_GEMM_LAYOUT={value!r} is not a layout; use tuned (the default), kmajor, "
                          f"nk or onednn, or unset it")
    return value


def cpu_native() -> bool:
    """DEEPPORT_CPU_NATIVE=0: the cpu backend does not build or use its C kernels (torch's calls run instead)."""
    return os.environ.get("DEEPPORT_CPU_NATIVE", "1") not in ("0", "false", "no")
