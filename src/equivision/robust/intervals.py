"""95% confidence intervals of the figures of a robustness evaluation.

* :func:`wilson_interval`: the Wilson score interval of a proportion (an accuracy over
  ``n`` independent images); it stays inside [0, 1] and is not degenerate at 0 or 1.
* :func:`bootstrap_interval`: the percentile bootstrap over images of any statistic of
  per-image values (a dataset mIoU from per-image confusion matrices, a mean per-image
  mIoU), with a seeded generator.

Both return ``(low, high)``; NaN bounds when there is nothing to resample.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Z95", "bootstrap_interval", "wilson_interval"]

#: the two-sided 95% normal quantile
Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of ``successes`` out of ``n`` trials.

    Raises:
        ValueError: ``successes`` outside ``[0, n]``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes!r}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(n: int, statistic: Callable[[Tensor], Tensor], samples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of ``n`` images.

    Args:
        n: number of images.
        statistic: maps resampling weights ``(S, N)`` float64 (how often each image was
            drawn in each of the ``S`` resamples; every row sums to ``N``) to the ``S``
            statistics ``(S,)`` (NaN entries are dropped), e.g. ``weights @ scores / N``.
        samples: bootstrap resamples ``S``.
        level: coverage of the interval.
        seed: seed of the resampling.
    """
    if n <= 0:
        return float("nan"), float("nan")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, n, (samples, n), generator=gen)
    weights = torch.zeros(samples, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(samples, n, dtype=torch.float64))
    stats = torch.as_tensor(statistic(weights), dtype=torch.float64).flatten()
    stats = stats[torch.isfinite(stats)]
    if stats.numel() == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2
    q = torch.quantile(stats, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(q[0]), float(q[1])
