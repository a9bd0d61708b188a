"""Registers the in-tree backends through the same pluggy hook third-party plugins use."""
from deepport.core.plugins import hookimpl


@hookimpl
def deepport_backends():
    from deepport.backends import ascend, cpu, cpu_ref, cuda, rocm

    return [cpu_ref.BACKEND, cpu.BACKEND, cuda.BACKEND, rocm.BACKEND, ascend.BACKEND]
