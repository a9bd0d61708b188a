"""Fixture helper: the CPU torch_npu stand-in on sys.path for one test, removed again afterwards."""
import sys
from pathlib import Path

import pytest

STANDIN = Path(__file__).parent / "npu_standin"


def _forget() -> None:
    for name in [m for m in sys.modules if m == "torch_npu" or m.startswith("torch_npu.")]:
        del sys.modules[name]
    sys.modules.pop("deepport.backends.ascend.ops", None)
    pkg = sys.modules.get("deepport.backends.ascend")
    if pkg is not None and hasattr(pkg, "ops"):
        delattr(pkg, "ops")  # else `from deepport.backends.ascend import ops` returns the stale module


@pytest.fixture
def npu(monkeypatch):
    """Import the stand-in (chip: Ascend 910B, soc 223; tensors on the CPU); yields the torch_npu module."""
    _forget()
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.setenv("NPU_STANDIN_SOC", "223")
    monkeypatch.setenv("DEEPPORT_DEVICE", "cpu")
    import torch_npu

    from deepport.backends.ascend import ops

    torch_npu.reset_calls()
    ops.reset_paths()
    yield torch_npu
    _forget()
