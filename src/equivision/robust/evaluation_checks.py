"""The automatic checks (:mod:`equivision.robust.checks`) that run with every
:func:`~equivision.robust.evaluate.evaluate_robustness`.

Levels (``RobustnessConfig.checks``): ``"none"``; ``"basic"``: randomness of the attacked
system, zero/NaN gradients (of the bare model and, with a defense, along the BPDA path
through it), the black-box check from the ensemble's Square stage and the transfer check
from the per-image defended results; ``"all"`` adds the two curves, on the first
``check_images`` images: accuracy at ``eps``, ``4 eps`` and ``16 eps`` (capped at 0.5 for
L-inf) and at ``steps`` and ``2 steps`` of the first attack that targets the attacked
system.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from .apgd import evaluating
from .attacks import IterativeAttack
from .checks import (
    CheckResult,
    check_black_box,
    check_convergence,
    check_eps_growth,
    check_gradients,
    check_randomness,
    check_transfer,
)
from .defenses import Defense
from .per_image import PerImageResults

__all__ = ["LEVELS", "basic_checks", "curve_checks", "eps_values", "result_checks"]

LEVELS = ("all", "basic", "none")


def basic_checks(model: nn.Module, defense: Defense | None, images: Tensor, labels: Tensor,
                 ignore_index: int) -> list[CheckResult]:
    """Randomness of the attacked system and zero/NaN gradients on ``images (B, C, H, W)``."""
    system = defense if defense is not None else model
    with evaluating(system):
        out = [check_randomness(system, images)]
    out.append(check_gradients(model, images, labels, ignore_index=ignore_index))
    if defense is not None:
        grad = check_gradients(defense, images, labels, through="bpda",
                               ignore_index=ignore_index)
        grad.name = "gradients (defense, bpda)"
        out.append(grad)
    return out


def result_checks(per_image: PerImageResults, targets: Mapping[str, str | None],
                  square: tuple[Tensor, Tensor] | None) -> list[CheckResult]:
    """Checks from the results: black-box (robust images ``(N,)`` before and after the
    ensemble's Square stage, when it ran) and transfer (per image, robust under every
    attack generated on the bare model vs under every attack through the defense, on the
    defended prediction; when both kinds of rows exist)."""
    out = []
    if square is not None:
        out.append(check_black_box(square[0] > 0, square[1] > 0))
    if per_image.has("defended"):
        j = 1  # the defended key: the worst case over the defense's repeats
        white = [per_image.rows.index(r) for r, t in targets.items() if t == "defense"]
        transfer = [per_image.rows.index(r) for r, t in targets.items() if t == "model"]
        if white and transfer:
            robust = per_image.scores[:, j] > 0
            out.append(check_transfer(robust[white].all(0), robust[transfer].all(0)))
    return out


def eps_values(eps: float, norm: str, image_numel: int) -> list[float]:
    """The eps values of the eps-growth curve: ``eps, 4 eps, 16 eps`` capped at 0.5 (L-inf)
    or ``0.5 sqrt(C H W)`` (L2), duplicates removed."""
    cap = 0.5 if norm == "linf" else 0.5 * math.sqrt(image_numel)
    return sorted({min(eps * f, max(cap, eps)) for f in (1, 4, 16)})


def curve_checks(system: nn.Module, run: Callable[[float, int], Tensor], images: Tensor,
                 labels: Tensor, eps: float, steps: int, norm: str,
                 ignore_index: int) -> list[CheckResult]:
    """Eps-growth and convergence of the attack ``run(eps, steps) -> adversarial images``
    against ``system`` (a model or a defense; one seeded purification draw) on
    ``images (B, C, H, W)``."""
    scorer = IterativeAttack(system, 1.0, ignore_index=ignore_index)

    def accuracy(adv: Tensor) -> float:
        with evaluating(system):
            return float(scorer.score(adv, labels)[0].mean())

    by_eps = {e: accuracy(run(e, steps)) for e in eps_values(eps, norm, images[0].numel())}
    out = [check_eps_growth(by_eps)] if len(by_eps) > 1 else []
    by_steps = {steps: by_eps[min(by_eps, key=lambda e: abs(e - eps))],
                2 * steps: accuracy(run(eps, 2 * steps))}
    out.append(check_convergence(by_steps))
    return out
