"""The ``throughput`` sub-command of ``experiments/defense.py``: images per core-second of
a defended prediction and of one BPDA+EOT draw-step (one purification, the model's
forward and backward) at several batch sizes and purifier steps ``T``, on one thread, to
plan the sizes of ``worstcase`` (a BPDA+EOT stage of ``s`` steps x ``e`` draws costs
``s e`` draw-steps per image still attacked)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from equivision.robust.attacks import BPDA
from equivision.robust.registry import build_defense

__all__ = ["throughput"]


def _per_image(fn: Callable[[], Any], batch: int, budget: float) -> float:
    """Core-seconds per image of ``fn()`` on a batch of ``batch`` (repeated for at least
    ``budget`` core-seconds)."""
    reps, t0 = 0, time.process_time()
    while reps == 0 or time.process_time() - t0 < budget:
        fn()
        reps += 1
    return (time.process_time() - t0) / reps / batch


def _predict(model: nn.Module, defense: nn.Module, x: Tensor, gen: torch.Generator) -> None:
    with torch.no_grad():
        model(defense.purify(x, generator=gen))


def throughput(model: nn.Module, feature_layer: str, eps: float, eps_v: float,
               shape: Sequence[int], batches: Sequence[int] = (1, 16, 64),
               steps: Sequence[int] = (5, 20), kind: str = "equivariance",
               budget: float = 2.0) -> list[dict[str, Any]]:
    """One row per ``(T, batch)``: ``{"T", "batch", "predict" (images per core-second of a
    defended prediction), "bpda_step" (image draw-steps per core-second)}``; ``shape`` is
    one image's ``(C, H, W)``; each timing repeats for ``budget`` core-seconds."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # warm-up: the first call of a process pays one-off costs
        model(torch.rand(1, *shape, generator=gen))
    for t in steps:
        defense = build_defense(kind, model, eps_v=eps_v, steps=t, feature_layer=feature_layer)
        for b in batches:
            x = torch.rand(b, *shape, generator=gen)
            y = torch.randint(0, 10, (b,), generator=gen)
            # one draw-step: the difference of a 3-step and a 1-step attack, over 2 steps
            # (the start and the last iterate's scoring cancel)
            one, three = (BPDA(defense, eps, steps=s, eot_samples=1, seed=0) for s in (1, 3))
            step = (_per_image(partial(three, x, y), b, budget)
                    - _per_image(partial(one, x, y), b, budget)) / 2
            pred = _per_image(partial(_predict, model, defense, x, gen), b, budget)
            rows.append({"T": t, "batch": b, "predict": 1 / pred,
                         "bpda_step": 1 / step if step > 0 else float("nan")})
    return rows
