"""All-gather across processes, with and without gradients.

The released SER code gathers the token maps inside ``torch.no_grad``, so the
patch-wise loss never sends a gradient back to the encoder.  :func:`gather_with_grad`
is autograd-aware: every process receives the concatenation of all processes'
tensors, and the backward pass sums (``all_reduce``) the gradient that every
process computed for each slice and hands each process the part for its own slice.
With a per-process loss ``L_k`` this gives each process ``d(sum_k L_k)/d x_local``;
a DistributedDataParallel-style average of parameter gradients then equals the
gradient of ``mean_k L_k``.

Tensors may differ in their first dimension across processes (they are padded for
the collective and cut back afterwards).  Without an initialised process group
both functions return their input unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..training.distributed import dist_info as rank_and_world

__all__ = ["all_reduce_sum", "gather_no_grad", "gather_with_grad", "rank_and_world"]


def _sizes(n: int, device: torch.device) -> list[int]:
    _, world = rank_and_world()
    local = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(out, local)
    return [int(s.item()) for s in out]


def _gather(x: Tensor, sizes: list[int]) -> Tensor:
    biggest = max(sizes)
    pad = x.new_zeros((biggest - x.shape[0], *x.shape[1:]))
    padded = torch.cat([x, pad]).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, _ = rank_and_world()
        sizes = _sizes(x.shape[0], x.device)
        ctx.rank, ctx.sizes = rank, sizes
        return _gather(x.detach(), sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x (n_k, ...)`` of every process along dim 0, keeping gradients.

    Returns ``(sum_k n_k, ...)`` in rank order.  Every process must call it (it is a
    collective).  Gradients flow back to each process's own ``x``.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Like :func:`gather_with_grad` but detached (for targets: momentum keys, masks)."""
    _, world = rank_and_world()
    if world == 1:
        return x.detach()
    return _gather(x.detach(), _sizes(x.shape[0], x.device))


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum a detached tensor over all processes (identity without a process group)."""
    _, world = rank_and_world()
    x = x.detach().clone()
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
