"""A training callback that measures equivariance error per layer after every epoch
(using-and-abusing paper, figure 4)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset, Subset

from ..io import write_atomic
from ..transforms import Transform
from .engine import measure


class EquivarianceErrorCallback:
    """After each epoch, measure ``metrics`` (default MSE and L1 equivariance error) of
    every measurement point on a fixed subset of ``data`` and keep them per layer and
    per part; ``history`` is a list of ``{"epoch", "layers": {name: {...}}, "parts":
    {part: {...}}}``. With ``path`` the history is also written (JSON, atomically)
    after every epoch.

    ``grid_offsets`` is passed to :func:`~.engine.measure`; the default ``"ignore"``
    measures rotations about each map's own centre also where the sampling grid is off
    the image's centre, because the error of such approximate networks is what the
    figure shows (``"flag"`` leaves those layers out as inexact).

    Use with :func:`equivision.training.train` (``callbacks=[cb]``).
    """

    def __init__(self, data: Dataset, transforms: Sequence[Transform] | str = "rot90",
                 layers: Sequence[str] | None = None, max_images: int = 256,
                 metrics: Sequence[str] = ("mse", "l1", "nmse"),
                 path: str | Path | None = None, grid_offsets: str = "ignore") -> None:
        n = len(data)  # type: ignore[arg-type]
        self.data = Subset(data, list(range(min(n, max_images))))
        self.transforms, self.layers, self.metrics = transforms, layers, tuple(metrics)
        self.path = Path(path) if path is not None else None
        self.grid_offsets = grid_offsets
        self.history: list[dict[str, Any]] = []

    def on_epoch_end(self, epoch: int, model: nn.Module, history: dict) -> None:
        # the history keeps means only: no bootstrap intervals (they would cost every epoch)
        rep = measure(model, self.data, self.transforms, layers=self.layers, progress=False,
                      ci_groups=0, grid_offsets=self.grid_offsets)
        layers = {}
        for name in rep.layers:
            vals = {}
            for m in self.metrics:
                xs = [rep.get(t, name).metrics.get(m) for t in rep.transforms]
                xs = [x for x in xs if x is not None]
                vals[m] = sum(xs) / len(xs) if xs else None
            layers[name] = {"part": rep.get(rep.transforms[0], name).part, **vals}
        self.history.append({"epoch": epoch, "layers": layers,
                             "parts": rep.part_summary(self.metrics)})
        if self.path is not None:
            write_atomic(self.path, json.dumps(self.history, indent=1))
