"""torch.distributed world for tensor x expert parallelism: torchrun environment, process groups, rank 0.

Ranks form a TP x EP grid, rank = ep_rank * tp + tp_rank: a tensor-parallel group is `tp` consecutive
ranks (one node's GPUs at TP=8), an expert-parallel group takes one rank of each TP group.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from deepport.core.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Where one rank sits in the TP x EP grid (no process group needed: used for validation and slicing)."""

    tp: int = 1
    ep: int = 1
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp

    def tp_ranks(self) -> list[int]:
        return [self.ep_rank * self.tp + t for t in range(self.tp)]

    def ep_ranks(self) -> list[int]:
        return [e * self.tp + self.tp_rank for e in range(self.ep)]


@dataclass
class World:
    """A Layout with live process groups (None: the group has one rank, so collectives are identities)."""

    layout: Layout
    local_rank: int = 0
    tp_group: object = None
    ep_group: object = None
    group: object = None  # every rank of the grid (torch.distributed's WORLD)

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def is_rank0(self) -> bool:
        return self.layout.rank == 0


def env_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (0, 1, 0 outside it)."""
    def read(key, default):
        value = os.environ.get(key, default)
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not an integer; launch with torchrun, which sets it") from None

    return read("RANK", "0"), read("WORLD_SIZE", "1"), read("LOCAL_RANK", "0")


def check_world(tp: int, ep: int) -> Layout:
    """The Layout for this process, or ConfigError when the launch does not match --tp x --ep (no collective)."""
    if tp < 1 or ep < 1:
        raise ConfigError(f"--tp {tp} / --ep {ep}: both must be at least 1")
    rank, world_size, _ = env_rank()
    if world_size != tp * ep:
        how = ("WORLD_SIZE is not set (not launched by torchrun)" if "WORLD_SIZE" not in os.environ
               else f"this launch has {world_size} processes")
        raise ConfigError(f"--tp {tp} x --ep {ep} needs {tp * ep} processes, but {how}; launch with "
                          f"`torchrun --nproc-per-node {tp * ep} -m deepport ...` or change --tp/--ep")
    return Layout(tp, ep, rank)


def init(layout: Layout, dist_backend: str, device_type: str, timeout_s: float = 300.0) -> World:
    """Join the process group (torchrun's env:// rendezvous) and build the TP and EP groups.

    Every rank must have validated its configuration before calling this: a rank that raised earlier
    makes the others fail after `timeout_s` instead of hanging.
    """
    import torch.distributed as dist

    _, _, local_rank = env_rank()
    if layout.world_size == 1:
        return World(layout, local_rank)
    timeout = timedelta(seconds=timeout_s)
    if device_type != "cpu" and hasattr(getattr(torch, device_type, None), "set_device"):
        getattr(torch, device_type).set_device(local_rank)  # cuda (also ROCm), npu
    if not dist.is_initialized():
        dist.init_process_group(dist_backend, timeout=timeout)
    if dist.get_world_size() != layout.world_size or dist.get_rank() != layout.rank:
        raise ConfigError(f"the process group has {dist.get_world_size()} ranks (this is rank {dist.get_rank()}) "
                          f"but --tp x --ep needs {layout.world_size}; destroy the existing group or fix --tp/--ep")
    tp_group = ep_group = None
    for e in range(layout.ep):  # every rank creates every group, in the same order
        g = dist.new_group([e * layout.tp + t for t in range(layout.tp)], timeout=timeout)
        if e == layout.ep_rank and layout.tp > 1:
            tp_group = g
    for t in range(layout.tp):
        g = dist.new_group([e * layout.tp + t for e in range(layout.ep)], timeout=timeout)
        if t == layout.tp_rank and layout.ep > 1:
            ep_group = g
    return World(layout, local_rank, tp_group, ep_group, dist.group.WORLD)


def device_for(world: World | None, device: torch.device) -> torch.device:
    """This rank's device: cuda/npu get the local rank's index; cpu stays cpu."""
    if world is None or world.layout.world_size == 1 or device.type == "cpu" or device.index is not None:
        return device
    return torch.device(device.type, world.local_rank)


def shutdown() -> None:
    """Leave the process group (no-op when none was joined). On gloo, every rank first waits for the others
    (a barrier with a timeout): a rank that tore its transport down while a peer still talked to it could
    abort at exit ("terminate called without an active exception", seen once in CI with 4 ranks)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo":
            try:
                dist.monitored_barrier(timeout=timedelta(seconds=SHUTDOWN_BARRIER_S))
            except RuntimeError as e:  # a peer has already gone (it failed and says why): say so, leave anyway
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"deepport: rank {dist.get_rank()}: not every rank reached the end within "
                      f"{SHUTDOWN_BARRIER_S:.0f} s ({why}); leaving the process group anyway", file=sys.stderr)
        dist.destroy_process_group()
        _left_group[0] = True


SHUTDOWN_BARRIER_S = 30.0
_left_group = [False]


def exit_after_group(code: int) -> int:
    """Return `code`, or, in a process that has left a process group, end it now with `code` (stdio flushed) and
    skip the interpreter's teardown: gloo's worker threads can still be torn down there, which aborts a rank that
    finished its work ("terminate called without an active exception", exit -6; seen in CI with 4 ranks on 2
    cores, now and then, even after the barrier above)."""
    if _left_group[0]:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


@contextmanager
def one_rank_at_a_time(layout: Layout | None):
    """Serialise a block across the ranks of one host (an flock in the deepport cache), e.g. writing a preset."""
    if layout is None or layout.world_size == 1:
        yield
        return
    import fcntl

    from deepport.core import settings

    root = settings.cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".rank.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
