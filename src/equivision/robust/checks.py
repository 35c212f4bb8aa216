"""Automatic sanity checks of a robustness evaluation, as AutoAttack prints its flags.

Each check returns a :class:`CheckResult`: whether it flags a problem, a one-line
message and the numbers behind it. A flag means the evaluation may overstate robustness:

* :func:`check_randomness`: two forward passes of the defended model differ (use EOT and
  the ``"rand"`` ensemble, and report the worst case over draws);
* :func:`check_gradients`: zero or non-finite input gradients for some images
  (gradient masking or a broken gradient path: use BPDA or a gradient-free attack);
* :func:`check_black_box`: the gradient-free attack (Square) fooled images the
  white-box attacks did not;
* :func:`check_transfer`: an attack transferred from the bare model fooled images the
  white-box attack on the defense did not;
* :func:`check_eps_growth`: accuracy does not fall to (near) 0 as eps grows, or rises
  with eps;
* :func:`check_convergence`: more steps still lower the accuracy (not converged).

:func:`accuracy_curve` gives the accuracies the last two take; :func:`ensemble_checks`
runs the black-box check on an ensemble's stages (Square after the APGD stages).

:func:`run_checks` formats several results as lines to print; :func:`checks_summary`
adds what each flag means (:data:`MEANINGS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..metrics import IGNORE_INDEX
from .apgd import evaluating
from .attacks import IterativeAttack
from .ensemble import EnsembleResult

__all__ = [
    "MEANINGS",
    "CheckResult",
    "accuracy_curve",
    "check_black_box",
    "check_convergence",
    "check_eps_growth",
    "check_gradients",
    "check_randomness",
    "check_transfer",
    "checks_summary",
    "ensemble_checks",
    "run_checks",
]


@dataclass
class CheckResult:
    """One automatic check.

    Attributes:
        name: short identifier (``"randomness"``, ``"gradients"``, ...).
        flagged: True when the check found a problem.
        message: one line saying what was found and what it means.
        details: the numbers behind the message.
    """

    name: str
    flagged: bool
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"[{'WARNING' if self.flagged else 'ok'}] {self.name}: {self.message}"


@torch.no_grad()
def check_randomness(model: nn.Module, images: Tensor, tol: float = 0.0) -> CheckResult:
    """Flag a model whose two forward passes on ``images (B, C, H, W)`` differ by more
    than ``tol`` (max absolute difference of the outputs)."""
    with torch.enable_grad():  # a purifier takes gradients of its own
        first, second = model(images), model(images)
    diff = float((first.detach() - second.detach()).abs().max())
    flagged = diff > tol
    msg = (f"two forward passes differ (max |diff| {diff:.3g}): the model is randomized; "
           "attack it with EOT (ensemble version 'rand') and report the worst case over "
           "draws") if flagged else "two forward passes agree: deterministic model"
    return CheckResult("randomness", flagged, msg, {"max_abs_diff": diff})


def check_gradients(model: nn.Module, images: Tensor, labels: Tensor, through: str = "plain",
                    ignore_index: int = IGNORE_INDEX) -> CheckResult:
    """Flag images whose cross-entropy input gradient ``(C, H, W)`` along the gradient path
    ``through`` is exactly zero or not finite (``images (B, C, H, W)`` in [0, 1]); the model
    runs in eval mode."""
    core = IterativeAttack(model, 1.0, through=through, ignore_index=ignore_index)
    x, labels = core._check_images(images, labels)
    with torch.enable_grad(), evaluating(model):
        grad = core._gradient(x, labels, 0, 0, check=True).flatten(1)
    nonfinite = int((~torch.isfinite(grad)).any(1).sum())
    zero = int((grad == 0).all(1).sum())
    n = grad.shape[0]
    flagged = nonfinite > 0 or zero > 0
    msg = (f"{zero} of {n} images have a zero gradient and {nonfinite} a NaN/inf one "
           f"(through={through!r}): gradient masking or a broken path; white-box results "
           "are unreliable, use BPDA or Square") if flagged else \
        f"all {n} images have finite, non-zero gradients (through={through!r})"
    return CheckResult("gradients", flagged, msg, {"zero": zero, "nonfinite": nonfinite,
                                                   "images": n})


def _extra_fooled(name: str, what: str, white: Tensor, other: Tensor, tol: float,
                  advice: str) -> CheckResult:
    """Compare per-image robust booleans ``(B,)``: images ``other`` fooled and ``white``
    did not."""
    white, other = white.bool().flatten(), other.bool().flatten()
    if white.shape != other.shape:
        raise ValueError(f"per-image results differ in length: {white.numel()} vs "
                         f"{other.numel()}")
    extra = int((white & ~other).sum())
    n = white.numel()
    frac = extra / max(n, 1)
    flagged = frac > tol
    msg = (f"{what} fooled {extra} of {n} images ({100 * frac:.1f}%) the white-box attack "
           f"did not: {advice}") if flagged else \
        f"{what} fooled no more than {100 * tol:.1f}% of images beyond the white-box attack"
    return CheckResult(name, flagged, msg, {"extra_fooled": extra, "images": n,
                                            "white_box_robust": int(white.sum()),
                                            "other_robust": int(other.sum())})


def check_black_box(white_robust: Tensor, black_robust: Tensor,
                    tol: float = 0.0) -> CheckResult:
    """Flag when the gradient-free attack fooled more than a fraction ``tol`` of the images
    that survived the white-box attacks; arguments are per-image robust booleans ``(B,)``
    (True = still right)."""
    return _extra_fooled("black-box", "the gradient-free attack", white_robust, black_robust,
                         tol, "the gradients are misleading (masking); the white-box "
                         "evaluation is unreliable")


def check_transfer(white_robust: Tensor, transfer_robust: Tensor,
                   tol: float = 0.0) -> CheckResult:
    """Flag when the transfer attack (generated on the bare model) fooled more than a
    fraction ``tol`` of the images that survived the white-box attack on the defense;
    per-image robust booleans ``(B,)``."""
    return _extra_fooled("transfer", "the transfer attack", white_robust, transfer_robust,
                         tol, "the white-box gradient path through the defense is weak; "
                         "use BPDA/EOT or the adaptive attack")


def check_eps_growth(accuracy: Mapping[float, float], floor: float = 0.05,
                     tol: float = 0.01) -> CheckResult:
    """Flag accuracies ``{eps: robust accuracy}`` that rise with eps by more than ``tol``
    or stay above ``floor`` at the largest eps (a strong attack with a large eps should
    reach ~0)."""
    if len(accuracy) < 2:
        raise ValueError("check_eps_growth needs accuracies at two or more eps values")
    items = sorted(accuracy.items())
    rises = [(a, b) for (a, acc_a), (b, acc_b) in zip(items, items[1:]) if acc_b > acc_a + tol]
    eps_max, acc_max = items[-1]
    stuck = acc_max > floor
    flagged = bool(rises) or stuck
    if rises:
        msg = (f"accuracy rises from eps {rises[0][0]:g} to {rises[0][1]:g}: the attack "
               "fails to use a larger budget (gradient masking or a weak attack)")
    elif stuck:
        msg = (f"accuracy is still {acc_max:.3f} at eps {eps_max:g} (> {floor:g}): it should "
               "go to 0 as eps grows; the attack may be too weak")
    else:
        msg = f"accuracy falls with eps and reaches {acc_max:.3f} at eps {eps_max:g}"
    return CheckResult("eps-growth", flagged, msg, {"accuracy": dict(items), "rises": rises})


def accuracy_curve(model: nn.Module, make_attack: Callable[[Any], Callable[[Tensor, Tensor],
                                                                        Tensor]],
                   values: Sequence[Any], images: Tensor, labels: Tensor,
                   ignore_index: int = IGNORE_INDEX) -> dict[Any, float]:
    """``{value: mean score}`` of ``model`` on ``make_attack(value)(images, labels)`` for
    every value (eps values for :func:`check_eps_growth`, step counts for
    :func:`check_convergence`); the score is the per-image accuracy or mIoU of the attacked
    system (a defense purifies with one seeded draw)."""
    scorer = IterativeAttack(model, 1.0, ignore_index=ignore_index)
    curve = {}
    for value in values:
        adv = make_attack(value)(images, labels)
        with evaluating(model):
            curve[value] = float(scorer.score(adv, labels.to(adv.device))[0].mean())
    return curve


def check_convergence(accuracy: Mapping[int, float], tol: float = 0.01) -> CheckResult:
    """Flag accuracies ``{steps: robust accuracy}`` where the most steps still lower the
    accuracy by more than ``tol`` below the second most (the attack has not converged)."""
    if len(accuracy) < 2:
        raise ValueError("check_convergence needs accuracies at two or more step counts")
    items = sorted(accuracy.items())
    (s_prev, a_prev), (s_last, a_last) = items[-2], items[-1]
    drop = a_prev - a_last
    flagged = drop > tol
    msg = (f"{s_last} steps lower accuracy by {drop:.3f} below {s_prev} steps: not "
           "converged, run more steps or restarts") if flagged else \
        f"{s_last} steps change accuracy by {-drop:+.3f} from {s_prev} steps: converged"
    return CheckResult("convergence", flagged, msg, {"accuracy": dict(items), "drop": drop})


def ensemble_checks(result: EnsembleResult, black_box: str = "square",
                    tol: float = 0.0) -> list[CheckResult]:
    """The checks an :class:`~equivision.robust.ensemble.EnsembleResult` allows on its own:
    :func:`check_black_box` between the robust images ``(B,)`` before the stage named
    ``black_box`` and after it (nothing when the ensemble has no such stage)."""
    names = [s.name for s in result.stages]
    if black_box not in names:
        return []
    i = names.index(black_box)
    return [check_black_box(result.stages[i - 1].score > 0, result.stages[i].score > 0, tol)]


def run_checks(results: Iterable[CheckResult]) -> list[str]:
    """One printable line per result, warnings first."""
    ordered = sorted(results, key=lambda r: not r.flagged)
    return [str(r) for r in ordered]


#: what a flag of each check means, for the printed summary
MEANINGS = {
    "randomness": "the defended system gives different outputs on the same input: attack "
                  "it with EOT (ensemble 'rand') and report the worst case over repeats",
    "gradients": "some input gradients are zero or NaN: gradient masking or a broken "
                 "gradient path, so gradient attacks can fail without the model being robust",
    "black-box": "the gradient-free Square attack fooled images the gradient attacks did "
                 "not: the gradients mislead (masking); the white-box numbers overstate "
                 "robustness",
    "transfer": "attacks made on the bare model fooled the defense where attacks through "
                "the defense did not: the white-box path through the defense is weak",
    "eps-growth": "accuracy does not fall towards 0 as eps grows: the attack cannot use a "
                  "larger budget (masking or a weak attack)",
    "convergence": "twice the steps still lowered the accuracy: the attack has not converged, "
                   "the reported accuracy is an upper bound",
}


def checks_summary(results: Iterable[CheckResult]) -> str:
    """The printable block of an evaluation's checks: one line per check (warnings first),
    then what each raised flag means; says so when nothing was flagged."""
    results = list(results)
    if not results:
        return "automatic checks: none run"
    flagged = [r for r in results if r.flagged]
    head = (f"automatic checks: {len(flagged)} of {len(results)} flagged (a flag means the "
            "evaluation may overstate robustness)")
    lines = [head] + ["  " + line for line in run_checks(results)]
    for name in dict.fromkeys(r.name.split(" ")[0] for r in flagged):
        if name in MEANINGS:
            lines.append(f"  meaning of {name}: {MEANINGS[name]}")
    return "\n".join(lines)
