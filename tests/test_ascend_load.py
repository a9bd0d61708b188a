"""ascend dtype policy at load: FP8 checkpoints become BF16 on 910B/910C (with a notice), stay fp8 on the 950."""
import json
import os
import subprocess
import sys

import pytest

from ascend_standin import STANDIN, npu  # noqa: F401  (fixture)
from deepport import api
from deepport.backends import ascend
from deepport.core.errors import BackendError


@pytest.mark.parametrize("soc, ckpt_fp8, dtype", [("223", True, "bf16"), ("250", True, "bf16"), ("260", True, "fp8"),
                                                  ("260", False, "bf16"), ("223", False, "bf16")])
def test_auto_dtype_per_chip(npu, monkeypatch, soc, ckpt_fp8, dtype):
    monkeypatch.setenv("NPU_STANDIN_SOC", soc)
    assert api._pick_dtype("auto", ascend.BACKEND, ckpt_fp8=ckpt_fp8) == dtype


def test_explicit_fp8_refused_on_910c(npu, monkeypatch):
    monkeypatch.setenv("NPU_STANDIN_SOC", "250")
    with pytest.raises(BackendError, match="use --dtype bf16"):
        api._pick_dtype("fp8", ascend.BACKEND, ckpt_fp8=True)


SCRIPT = r"""
import json, sys, torch, deepport
m = deepport.load("tiny", backend="ascend")
ids = torch.tensor([[1, 5, 9, 200, 7, 31]])
r = deepport.load(m.path, backend="cpu_ref", dtype="bf16")  # the same FP8 checkpoint, dequantised by cpu_ref
fp8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
print(json.dumps({"dtype": m.dtype, "path": str(m.path),
                  "fp8_params": sum(p.dtype in fp8 for p in m.transformer.parameters()),
                  "bf16_params": sum(p.dtype == torch.bfloat16 for p in m.transformer.parameters()),
                  "diff": (m.logits(ids) - r.logits(ids)).abs().max().item(),
                  "scale": r.logits(ids).abs().max().item(),
                  "tokens": m.generate([1, 5, 9], max_new_tokens=3).tokens,
                  "tokens_ref": r.generate([1, 5, 9], max_new_tokens=3).tokens}))
"""


def test_fp8_checkpoint_dequantised_to_bf16_on_910b(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(STANDIN), NPU_STANDIN_SOC="223", DEEPPORT_CACHE=str(tmp_path))
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["path"].endswith("-fp8")  # the FP8 checkpoint was the one loaded
    assert out["dtype"] == "bf16" and out["fp8_params"] == 0 and out["bf16_params"] > 0
    notices = [line for line in p.stderr.splitlines() if "dequantising the FP8 checkpoint" in line]
    assert notices == ["deepport: backend 'ascend' has no fp8 on this device: dequantising the FP8 checkpoint to "
                       "bf16 at load"]
    assert out["diff"] <= 0.05 * out["scale"]  # bf16 rounding differences only
    assert out["tokens"] == out["tokens_ref"]
