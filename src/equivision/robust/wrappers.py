"""Model wrappers that let attacks work in [0, 1] pixel space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Normalize"]


class Normalize(nn.Module):
    """Wrap a model trained on normalized inputs so that it takes images in ``[0, 1]``.

    ``Normalize(model, mean, std)(x) = model((x - mean) / std)`` with per-channel ``mean``
    and ``std`` (``C`` values each, or one value for all channels). Attacks then perturb
    and clip in pixel space, where ``eps`` has its usual meaning. The wrapped network is
    ``.model``; ``mean`` and ``std`` are buffers ``(1, C, 1, 1)`` and follow ``.to()``.

    Raises:
        ValueError: empty or mismatched ``mean``/``std``, or a ``std`` entry <= 0.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float] | float,
                 std: Sequence[float] | float) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.numel() == 0 or s.numel() == 0 or (m.numel() != s.numel() and 1 not in
                                                 (m.numel(), s.numel())):
            raise ValueError(f"mean ({m.numel()} values) and std ({s.numel()} values) must "
                             "have one value per channel (or one value for all)")
        if not bool(torch.isfinite(m).all()) or not bool((s > 0).all()) \
                or not bool(torch.isfinite(s).all()):
            raise ValueError(f"std must be finite and > 0 and mean finite, got mean "
                             f"{m.tolist()}, std {s.tolist()}")
        self.model = model
        self.register_buffer("mean", m.view(1, -1, 1, 1))
        self.register_buffer("std", s.view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] -> the wrapped model's output."""
        c = self.mean.shape[1] if self.mean.shape[1] > 1 else self.std.shape[1]
        if x.dim() != 4 or (c > 1 and x.shape[1] != c):
            raise ValueError(f"Normalize expects images (B, {c}, H, W), got {tuple(x.shape)}")
        return self.model((x - self.mean) / self.std)
