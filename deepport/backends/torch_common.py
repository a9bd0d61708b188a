"""Torch-native sample, all_reduce and all_to_all: the native implementation any device backend binds.

They are cpu_ref's own functions: plain torch on the tensors' own device (cuda, npu, ...) and
torch.distributed on whatever process group the caller initialised with the backend's dist_backend
(nccl, which is RCCL on ROCm; hccl; gloo). Binding them is native, not a fallback: no kernel beats torch here.
"""
from deepport.backends.cpu_ref.ops import all_reduce, all_to_all, sample

__all__ = ["sample", "all_reduce", "all_to_all"]
