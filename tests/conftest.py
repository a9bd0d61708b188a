"""Test setup: the Triton interpreter is on for the whole session (it must be set before kernels import)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DEEPPORT_PROGRESS", "0")
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
