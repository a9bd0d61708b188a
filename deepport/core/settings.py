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
    return os.environ.get("DEEPPORT_DEVICE") or None


def cache_dir() -> Path:
    """DEEPPORT_CACHE: where generated preset checkpoints are materialised."""
    root = os.environ.get("DEEPPORT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "deepport")
    return Path(root)


def progress_enabled() -> bool:
    """DEEPPORT_PROGRESS=0 silences progress bars."""
    return os.environ.get("DEEPPORT_PROGRESS", "1") not in ("0", "false", "no")


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1 (Triton's own variable) means Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "", "false")


def interpret_fp8_format() -> str | None:
    """DEEPPORT_FP8_FORMAT: fp8 format a Triton backend uses under the interpreter (rocm: e4m3fnuz or e4m3fn)."""
    return os.environ.get("DEEPPORT_FP8_FORMAT") or None
