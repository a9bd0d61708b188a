"""Torch-native sample, all_reduce and all_to_all: the native implementation any device backend binds.

They run on the tensors' own device (cuda, npu, ...) and use torch.distributed on whatever process group
the caller initialised with the backend's dist_backend (nccl, which is RCCL on ROCm; hccl; gloo).
"""
from __future__ import annotations

import torch

from deepport.core.errors import ContractError
from deepport.core.formats import is_fp8


def sample(logits, temperature, top_p, generator):
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if not 0.0 < top_p <= 1.0:
        raise ContractError(f"sample: top_p={top_p} must be in (0, 1]; use 1.0 to keep every token")
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    # Exponential race argmax(p / Exp(1)): the noise comes from `generator` on its own device, so a CPU
    # generator draws the same tokens here as cpu_ref does; a device generator avoids the host copy.
    noise_device = generator.device if generator is not None else probs.device
    noise = torch.empty(probs.shape, dtype=torch.float32, device=noise_device)
    noise.exponential_(generator=generator)
    return (probs / noise.to(probs.device)).argmax(dim=-1)


def _dist_ready(group):
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(x, group=None):
    if is_fp8(x):
        raise ContractError(f"all_reduce: sums of {x.dtype} are not defined; upcast to bf16/fp32 before reducing")
    if _dist_ready(group):
        import torch.distributed as dist

        dist.all_reduce(x, group=group)
    return x


def all_to_all(x, output_split_sizes, input_split_sizes, group=None):
    if sum(input_split_sizes) != x.shape[0]:
        raise ContractError(f"all_to_all: input_split_sizes {list(input_split_sizes)} sum to "
                            f"{sum(input_split_sizes)}, but x has {x.shape[0]} rows")
    if not _dist_ready(group):
        return x
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if len(input_split_sizes) != world or len(output_split_sizes) != world:
        raise ContractError(f"all_to_all: split sizes need one entry per rank ({world}); got "
                            f"{len(input_split_sizes)} in, {len(output_split_sizes)} out")
    send = x.contiguous()
    wire = send.view(torch.uint8) if is_fp8(send) else send  # fp8 travels as bytes: no collective needs fp8 support
    out = torch.empty((sum(output_split_sizes), *send.shape[1:]), dtype=wire.dtype, device=x.device)
    dist.all_to_all_single(out, wire, list(output_split_sizes), list(input_split_sizes), group=group)
    return out.view(x.dtype) if is_fp8(send) else out
