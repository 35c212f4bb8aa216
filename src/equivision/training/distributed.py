"""torchrun hooks of the training runner: rank and world size, process-group set-up,
barriers, gradient averaging and state broadcasts.

Without an initialised ``torch.distributed`` process group every helper is a no-op for a
single process (rank 0 of a world of 1), so the same training code runs alone or under
``torchrun``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "dist_info",
    "is_writer",
    "maybe_init_distributed",
    "barrier",
    "gather_objects",
    "sync_grads",
    "broadcast_state",
    "broadcast_buffers",
]


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """True on the one process that writes files (rank 0)."""
    return dist_info()[0] == 0


def maybe_init_distributed(device_hint: str) -> None:
    """Initialise the default process group from torchrun's environment if needed
    (NCCL when the run will use CUDA, gloo otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return
    if dist.is_initialized():
        return
    cuda = device_hint.startswith("cuda") or (device_hint == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if cuda else "gloo")


def barrier() -> None:
    """Wait for every process (no-op for a single process)."""
    if dist_info()[1] > 1:
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` for a single process)."""
    world = dist_info()[1]
    if world <= 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def sync_grads(params: list[nn.Parameter], world: int) -> None:
    """Average gradients over processes (missing gradients count as zeros)."""
    if world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def broadcast_state(module: nn.Module) -> None:
    """Give every process rank 0's parameters and buffers."""
    for t in module.state_dict().values():
        if isinstance(t, Tensor):
            dist.broadcast(t, 0)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, centres) to every process, as DDP does."""
    for b in module.buffers():
        dist.broadcast(b, 0)
