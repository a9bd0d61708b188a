"""onnxruntime sessions on the CPU EP, and torch <-> ORT value conversion (bf16 and fp8 travel as raw bits)."""
from __future__ import annotations

import ctypes

import numpy as np
import onnx
import torch
from onnx import TensorProto

from deepport.core.errors import DeepportError

TORCH_TO_ONNX = {
    torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE, torch.bfloat16: TensorProto.BFLOAT16,
    torch.float16: TensorProto.FLOAT16, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
    torch.bool: TensorProto.BOOL, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
    torch.float8_e4m3fnuz: TensorProto.FLOAT8E4M3FNUZ,
}
ONNX_TO_TORCH = {v: k for k, v in TORCH_TO_ONNX.items()}
_RAW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e4m3fnuz: torch.uint8}


def session(model: onnx.ModelProto | str, threads: int = 1):
    """A CPU-EP InferenceSession (one intra-op thread by default: the CPU is shared)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def to_ort(t: torch.Tensor):
    """A CPU OrtValue holding t (bf16/fp8 passed as their bits with the ONNX element type)."""
    import onnxruntime as ort

    t = t.detach().cpu().contiguous()
    if t.dtype not in TORCH_TO_ONNX:
        raise DeepportError(f"cannot pass a {t.dtype} tensor to onnxruntime; use one of {list(TORCH_TO_ONNX)}")
    raw = t.view(_RAW[t.dtype]) if t.dtype in _RAW else t
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw.numpy(), TORCH_TO_ONNX[t.dtype])


def from_ort(value, elem_type: int) -> torch.Tensor:
    """A torch tensor copied from an OrtValue whose ONNX element type is elem_type (bf16/fp8 by their bytes)."""
    dtype = ONNX_TO_TORCH[elem_type]
    if dtype not in _RAW:
        return torch.from_numpy(np.ascontiguousarray(value.numpy())).to(dtype)
    out = torch.empty(tuple(value.shape()), dtype=dtype)
    if out.numel():
        ctypes.memmove(out.data_ptr(), value.data_ptr(), out.numel() * out.element_size())
    return out


def run(sess, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run a session on torch inputs; outputs come back as torch tensors of the graph's declared types."""
    outs = [o.name for o in sess.get_outputs()]
    types = {o.name: o.type for o in sess.get_outputs()}
    vals = sess.run_with_ort_values(outs, {k: to_ort(v) for k, v in feeds.items()})
    return [from_ort(v, _elem_type(types[n])) for n, v in zip(outs, vals)]


_TYPE_NAMES = {"tensor(float)": TensorProto.FLOAT, "tensor(double)": TensorProto.DOUBLE,
               "tensor(bfloat16)": TensorProto.BFLOAT16, "tensor(float16)": TensorProto.FLOAT16,
               "tensor(int64)": TensorProto.INT64, "tensor(int32)": TensorProto.INT32,
               "tensor(bool)": TensorProto.BOOL, "tensor(float8e4m3fn)": TensorProto.FLOAT8E4M3FN,
               "tensor(float8e4m3fnuz)": TensorProto.FLOAT8E4M3FNUZ}


def _elem_type(name: str) -> int:
    try:
        return _TYPE_NAMES[name]
    except KeyError:
        raise DeepportError(f"onnxruntime output type {name} has no torch equivalent here") from None
