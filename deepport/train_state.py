"""`train-tiny --state FILE`: the training state as one safetensors file (tensors) with its JSON header
(step, history, optimizer hyper-parameters). Nothing is unpickled: a state file cannot run code."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepport.core.errors import DeepportError

KEY = "deepport_train_state"
VERSION = 1


def save(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, history: dict) -> None:
    """Write model parameters, optimizer moments and the step/history (JSON metadata) to `path` atomically."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = {}
    for idx, per_param in opt["state"].items():
        for k, v in per_param.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    meta = {"version": VERSION, "step": step, "history": history, "param_groups": opt["param_groups"],
            "optimizer_scalars": scalars}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={KEY: json.dumps(meta)})
    os.replace(tmp, path)


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore model and optimizer from a state written by `save`; returns (step, history)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DeepportError(f"{path} is not a deepport training state ({type(e).__name__}: {e}); states are "
                            f"safetensors files written by train-tiny --state (pickled states from older versions "
                            f"are never loaded): delete it or pass another --state") from None
    if raw is None:
        raise DeepportError(f"{path} is a safetensors file without a {KEY} header; pass a train-tiny --state file")
    meta = json.loads(raw)
    if meta.get("version") != VERSION:
        raise DeepportError(f"{path} has training-state version {meta.get('version')}, expected {VERSION}; "
                            f"start a new --state file")
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd)
    except RuntimeError as e:
        raise DeepportError(f"{path} was written for another model configuration ({str(e).splitlines()[0]}); "
                            f"start a new --state file") from None
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for k, v in meta["optimizer_scalars"].items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["history"]
