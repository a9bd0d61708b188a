"""ascend without torch_npu: the dtype policy per chip, the fused ops' limits, and the probe's messages."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from deepport.backends import ascend
from deepport.backends.ascend import dtype_policy, limits
from deepport.core.registry import Probe


@pytest.mark.parametrize("soc, chip", [(220, "910B"), (223, "910B"), (225, "910B"), (250, "910C"), (255, "910C"),
                                       (260, "950"), (202, "310P"), (100, None), (240, None)])
def test_chip_of_soc(soc, chip):
    assert dtype_policy.chip_of_soc(soc) == chip


@pytest.mark.parametrize("chip, dtypes, fmt", [("910B", {"bf16"}, None), ("910C", {"bf16"}, None),
                                               ("950", {"fp8", "bf16"}, "e4m3fn"), (None, {"bf16"}, None)])
def test_dtypes_per_chip(chip, dtypes, fmt):
    assert dtype_policy.dtypes_for(chip) == dtypes
    assert dtype_policy.fp8_format_for(chip) == fmt
    assert ("bf16 only" in dtype_policy.describe(chip)) == (fmt is None)


def test_descriptor():
    b = ascend.BACKEND
    assert (b.name, b.device_type, b.dist_backend) == ("ascend", "npu", "hccl")
    assert b.dtypes == {"fp8", "bf16"} and b.fp8_format is dtype_policy.fp8_format  # fp8 resolved per chip


def test_probe_without_torch_npu(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    p = ascend.probe()
    assert p == Probe(False, ascend.NOT_INSTALLED)
    assert "CANN" in p.reason and "pip install 'deepport[ascend]'" in p.reason


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="a torch_npu is installed here")
def test_deepport_backends_shows_ascend_unavailable_with_reason():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEEPPORT_DEVICE")}
    out = subprocess.run([sys.executable, "-m", "deepport", "backends", "--json"], capture_output=True, text=True,
                         env=env, check=True).stdout
    row = next(r for r in json.loads(out) if r["name"] == "ascend")
    assert row["available"] is False and row["reason"] == ascend.NOT_INSTALLED
    assert row["device_type"] == "npu" and row["dist_backend"] == "hccl"
    assert "torch_npu" not in sys.modules  # probing never imported it


@pytest.mark.parametrize("chip, shape, fused", [
    ("910B", (256, 8, 4, 8), True),      # DeepSeek-V3: E=256, top-8, 8 groups / 4 chosen
    ("910C", (256, 8, 4, 8), True),
    ("910B", (16, 4, 2, 4), False),      # A2/A3 document only V3's routing shape
    ("910B", (256, 40, 4, 8), False),    # k > 32
    ("950", (16, 4, 2, 4), True),
    ("950", (4096, 8, 4, 8), False),     # > 2048 experts
    ("950", (16, 4, 4, 8), False),       # 2 experts per group: needs more than 2
])
def test_gating_limits(chip, shape, fused):
    e, k, kg, gc = shape
    assert (limits.gating_top_k(chip, e, k, kg, gc) is None) == fused


@pytest.mark.parametrize("h, padded", [(1, 1), (3, 4), (16, 16), (17, 32), (100, 128), (128, 128), (129, None)])
def test_mla_heads_padding(h, padded):
    assert limits.padded_heads(h) == padded


def _decode_inputs(dtype=torch.bfloat16, c=512, r=64, s=1, h=4, p=16):
    return (torch.empty(2, s, h, c, dtype=dtype), torch.empty(2, s, h, r, dtype=dtype),
            torch.empty(3, p, c, dtype=dtype), torch.empty(3, p, r, dtype=dtype))


@pytest.mark.parametrize("kw, word", [({}, None), ({"dtype": torch.float32}, "dtype"), ({"c": 128}, "512/64"),
                                      ({"r": 16}, "512/64"), ({"s": 17}, "1..16"), ({"h": 256}, "128"),
                                      ({"p": 4}, "block size"), ({"p": 2048}, "block size"),
                                      ({"p": 128, "s": 16}, None)])
def test_mla_decode_limits(kw, word):
    why = limits.mla_decode(*_decode_inputs(**kw))
    assert (why is None) if word is None else (word in why)


def test_mla_prefill_limits():
    bf = torch.bfloat16
    q, k = torch.empty(2, 3, 4, 192, dtype=bf), torch.empty(2, 5, 4, 192, dtype=bf)
    v = torch.empty(2, 5, 4, 128, dtype=bf)
    assert limits.mla_prefill(q, k, v, True) is None
    assert "192" in limits.mla_prefill(q[..., :48], k[..., :48], v, True)
    assert "bfloat16" in limits.mla_prefill(q.float(), k.float(), v.float(), True)
    assert "S=5 > T=3" in limits.mla_prefill(k, q, v[:, :3], True)


def test_rope_and_expert_limits():
    assert limits.interleave_rope(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)) is None
    assert "D = 64" in limits.interleave_rope(torch.empty(1, 1, 1, 16, dtype=torch.bfloat16))
    assert "bfloat16" in limits.interleave_rope(torch.empty(1, 1, 1, 64))
    x, w = torch.empty(4, 8, dtype=torch.bfloat16), torch.empty(2, 6, 8, dtype=torch.bfloat16)
    assert limits.moe_experts(x, w, w.transpose(1, 2), w) is None
    assert "dtype" in limits.moe_experts(x.float(), w, w, w)
    assert "fp8" in limits.moe_experts(x, w.float(), w, w)
    many = torch.empty(1025, 6, 8, dtype=torch.bfloat16)  # 1025 experts on one rank
    assert "1024 groups" in limits.moe_experts(x, many, many, many)
