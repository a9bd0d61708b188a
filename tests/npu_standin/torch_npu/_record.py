"""The stand-in's call log: op name, tensor summaries (shape, dtype) and every keyword, per call."""
import torch

CALLS: list[dict] = []


def _summary(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.is_contiguous())
    if isinstance(v, (list, tuple)):
        return [_summary(t) for t in v]
    return v


def record(op: str, args: tuple, kwargs: dict) -> None:
    CALLS.append({"op": op, "args": [_summary(a) for a in args],
                  "kwargs": {k: _summary(v) for k, v in kwargs.items()}})


def calls(op: str | None = None) -> list[dict]:
    return [c for c in CALLS if op is None or c["op"] == op]


def reset_calls() -> None:
    CALLS.clear()
