"""CPU stand-in for `torch_npu`, for tests only (never installed, never inside the deepport package).

It implements the documented semantics of exactly the torch_npu ops deepport's ascend backend calls,
with their argument checks and chip limits (op-plugin docs, docs/zh/custom_APIs/torch_npu/*.md), on CPU
tensors. It proves argument plumbing and layouts, never kernel behaviour: every report produced through
it is labelled "stand-in". Put tests/npu_standin on sys.path (or PYTHONPATH) to use it.

The chip it pretends to be comes from NPU_STANDIN_SOC (a torch_npu.npu.get_soc_version() value;
default 223, an Ascend 910B). Tensors stay on the CPU: importing it sets DEEPPORT_DEVICE=cpu unless set.
"""
import os

from torch_npu import npu
from torch_npu._ops import (npu_add_rms_norm, npu_fused_infer_attention_score, npu_grouped_matmul,
                            npu_interleave_rope, npu_moe_gating_top_k, npu_moe_init_routing_v2,
                            npu_moe_token_unpermute, npu_rms_norm, npu_swiglu)
from torch_npu._record import CALLS, calls, reset_calls

__deepport_stand_in__ = True
__version__ = "0.0+stand-in"

os.environ.setdefault("DEEPPORT_DEVICE", "cpu")

__all__ = ["npu", "CALLS", "calls", "reset_calls", "npu_rms_norm", "npu_add_rms_norm", "npu_interleave_rope",
           "npu_moe_gating_top_k", "npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_moe_token_unpermute",
           "npu_swiglu", "npu_fused_infer_attention_score"]
