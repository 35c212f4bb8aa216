"""Per-step schedules for self-supervised pretraining (learning rate, weight decay, ...).

Every schedule is a pure function of the global step, so a resumed run only needs the step
counter to continue exactly where it stopped.
"""

from __future__ import annotations

import math

__all__ = ["warmup_cosine", "cosine"]


def _check(step: int, total_steps: int, warmup_steps: int = 0) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps - 1`` and later)."""
    _check(step, total_steps)
    if total_steps == 1:
        return float(end)
    progress = min(1.0, step / (total_steps - 1))
    return float(end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress)))


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base: float,
    final: float = 0.0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then a cosine
    decay from ``base`` to ``final`` over the remaining steps (the DINO / MoCo-v3 recipe).

    The value at step ``s < warmup_steps`` is
    ``warmup_start + (base - warmup_start) * (s + 1) / warmup_steps`` (so the last warm-up
    step reaches ``base``); the cosine part starts at ``base`` on the next step.

    Raises:
        ValueError: negative steps, ``total_steps < 1`` or ``warmup_steps > total_steps``.
    """
    _check(step, total_steps, warmup_steps)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps}); shorten the "
            "warm-up or train longer"
        )
    if step < warmup_steps:
        return float(warmup_start + (base - warmup_start) * (step + 1) / warmup_steps)
    return cosine(step - warmup_steps, max(1, total_steps - warmup_steps), base, final)
