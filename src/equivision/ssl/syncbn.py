"""Batch normalisation over the global batch of all processes, on any backend.

``torch.nn.SyncBatchNorm`` runs on GPUs only; :class:`SyncBatchNorm` computes the same
statistics with the autograd-aware gather of :mod:`equivision.ssl.gather`, so it also
runs under gloo on CPUs. Under torchrun (world size > 1)
:func:`~equivision.ssl.pretrain.pretrain` converts the BatchNorm layers of the SSL
projectors and predictors with :func:`convert_sync_batchnorm`, as MoCo-v3 and Barlow
Twins do: each process's shard would otherwise be normalised by its own statistics,
which changes the method as the number of processes grows.

In training mode with an initialised process group the mean and the (biased) variance
are those of the whole global batch: two gathers, one of the per-channel sums and
counts, one of the sums of squared deviations from the global mean (shards may differ in
size). Gradients flow through both gathers, so every process gets ``d(sum_k L_k)/d x``
of its own shard. The running statistics follow the global batch (unbiased variance),
so they agree in every process. Otherwise the layer is a plain ``BatchNorm1d``; its
state dict is the same, so checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .gather import gather_with_grad, rank_and_world

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics span every process's batch.

    Input ``(B, C)`` or ``(B, C, L)``; output of the same shape.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x (B, C[, L])`` by the global batch's statistics when training
        under a process group of more than one process, else as ``BatchNorm1d``."""
        if not self.training or rank_and_world()[1] == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_full((1,), x.numel() / max(1, x.shape[1]))
        first = gather_with_grad(torch.cat([x.sum(dims), count])[None]).sum(0)
        n = first[-1].detach()
        mean = first[:-1] / n
        centred = x - mean.view(shape)
        var = gather_with_grad(centred.pow(2).sum(dims)[None]).sum(0) / n
        self._update_running(mean.detach(), var.detach(), float(n))
        y = centred / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, n: float) -> None:
        """The running statistics as ``BatchNorm1d`` moves them (unbiased variance)."""
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                    else self.momentum)
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm1d`` inside ``module`` (in place; ``module`` itself too) by
    a :class:`SyncBatchNorm` that shares its parameters and buffers, so an optimizer
    built before or after the conversion trains the same tensors; returns ``module``
    (or the replacement when ``module`` is a ``BatchNorm1d``)."""
    if type(module) is nn.BatchNorm1d:
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum,
                             module.affine, module.track_running_stats)
        sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
