"""Auto-PGD (Croce & Hein, ICML 2020): APGD with CE, DLR or SegPGD loss, and APGD-T.

APGD is PGD without a step size to tune. Per image it

* starts from a random point of the eps ball with step size ``eta = 2 eps``;
* takes momentum steps ``z = P(x_k + eta * dir(grad))``,
  ``x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))`` with
  ``alpha = 0.75`` (the first step has no momentum), where ``dir`` is the sign (L-inf) or
  the L2-normalised gradient (L2) and ``P`` projects onto the eps ball and [0, 1];
* at the checkpoints ``w_j = ceil(p_j N)`` (``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) halves ``eta`` and restarts from
  the best point so far when the loss rose in fewer than ``rho = 0.75`` of the steps since
  the last checkpoint, or when ``eta`` was not halved at the last checkpoint and the best
  loss has not improved since (:class:`StepSizeSchedule`);
* tracks the best iterate: the one on which the attacked model does worst (lowest
  accuracy or per-image mIoU, ties broken by the higher loss), which is returned.

Losses (:func:`apgd_objective`): ``"ce"``; ``"dlr"``, the difference of logits ratio
``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` (shift and scale invariant); and, for
segmentation, ``"segpgd"`` (Gu et al., ECCV 2022): the cross-entropy of the correctly
classified pixels weighted ``1 - lambda_t`` and of the misclassified ones ``lambda_t``,
``lambda_t = t / (2 N)``, so that pixels already wrong do not dominate the gradient.
Segmentation losses are averaged over each image's valid pixels (``ignore_index``
excluded). :class:`APGDT` runs the targeted DLR loss
``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` once per target among the top classes of
the clean prediction (per pixel for segmentation) and keeps the per-image worst case.

Any callable model works, including a defense: the gradient path (``through``), the EOT
draws (``eot_samples``, averaged per gradient) and the adaptive term (``lambda_e``) are
those of :class:`~equivision.robust.attacks.IterativeAttack`, which APGD uses for its
checks, random start and forward passes.

Example::

    adv = APGD(model, eps=8 / 255, steps=100, loss="dlr")(images, labels)
    adv = APGDT(model, eps=8 / 255, steps=100, n_targets=9)(images, labels)
    adv = APGD(defense, eps=8 / 255, through="bpda", eot_samples=20)(images, labels)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import IGNORE_INDEX, per_image_score
from .attacks import IterativeAttack, _flat_norm, _per_image, evaluating

__all__ = [
    "APGD",
    "APGDT",
    "APGD_LOSSES",
    "StepSizeSchedule",
    "apgd_checkpoints",
    "apgd_objective",
    "dlr_loss",
    "evaluating",
    "keep_worst",
    "merge_worst",
    "segpgd_loss",
]

APGD_LOSSES = ("ce", "dlr", "segpgd")
_TINY = 1e-12


# ---------------------------------------------------------------------- losses


def _safe_labels(output: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Labels with ignored pixels set to class 0 (their values are masked out later)."""
    return labels.masked_fill(labels == ignore_index, 0) if output.dim() == 4 else labels


def dlr_loss(output: Tensor, labels: Tensor, targets: Tensor | None = None,
             ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Difference-of-logits-ratio loss per image ``(B,)`` (higher = stronger attack).

    Untargeted: ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` with ``z`` sorted
    decreasingly as ``z_pi1 >= z_pi2 >= ...`` (needs ``K >= 3``). Targeted (``targets``
    given): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (needs ``K >= 4``).
    For segmentation ``(B, K, H, W)`` it is computed per pixel and averaged over each
    image's valid pixels.

    Args:
        output: logits ``(B, K)`` or ``(B, K, H, W)``.
        labels: true labels ``(B,)`` / ``(B, H, W)``.
        targets: target labels of the same shape, or None.
        ignore_index: label of ignored pixels.

    Raises:
        ValueError: too few classes.
    """
    k = output.shape[1]
    need = 3 if targets is None else 4
    if k < need:
        raise ValueError(f"the {'targeted ' if targets is not None else ''}DLR loss needs at "
                         f"least {need} classes, the model has {k}; use loss='ce'")
    z = output.float()
    y = _safe_labels(output, labels, ignore_index).unsqueeze(1)
    top = z.sort(dim=1, descending=True).values
    z_y = z.gather(1, y).squeeze(1)
    if targets is None:
        other = z.scatter(1, y, float("-inf")).amax(1)
        per = -(z_y - other) / (top[:, 0] - top[:, 2] + _TINY)
    else:
        z_t = z.gather(1, _safe_labels(output, targets, ignore_index).unsqueeze(1)).squeeze(1)
        per = -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _TINY)
    return _per_image(per, labels, ignore_index)


def segpgd_loss(output: Tensor, labels: Tensor, progress: float,
                ignore_index: int = IGNORE_INDEX) -> Tensor:
    """SegPGD's loss per image ``(B,)`` (Gu et al. 2022).

    ``((1 - lam) * sum_{correct} CE + lam * sum_{wrong} CE) / n_valid`` with
    ``lam = progress / 2``: early steps push the pixels still right, later ones weigh both
    kinds alike. Classification outputs are treated as one pixel per image.

    Args:
        output: logits ``(B, K)`` or ``(B, K, H, W)``.
        labels: labels ``(B,)`` / ``(B, H, W)`` (``ignore_index`` pixels excluded).
        progress: ``t / N`` in [0, 1], the fraction of the steps done.
        ignore_index: label of ignored pixels.
    """
    lam = 0.5 * float(progress)
    kwargs = {"ignore_index": ignore_index} if output.dim() == 4 else {}
    ce = F.cross_entropy(output.float(), labels, reduction="none", **kwargs)
    wrong = (output.argmax(1) != labels).float()
    return _per_image(ce * ((1.0 - lam) * (1.0 - wrong) + lam * wrong), labels, ignore_index)


def apgd_objective(output: Tensor, labels: Tensor, loss: str = "ce",
                   targets: Tensor | None = None, progress: float = 0.0,
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The per-image quantity ``(B,)`` APGD maximises.

    ``loss`` is ``"ce"`` (targeted: minus the cross-entropy to ``targets``), ``"dlr"``
    (targeted DLR when ``targets`` is given, see :func:`dlr_loss`) or ``"segpgd"``
    (:func:`segpgd_loss` at ``progress``; untargeted only).
    """
    if loss == "dlr":
        return dlr_loss(output, labels, targets, ignore_index)
    if loss == "segpgd":
        if targets is not None:
            raise ValueError("the segpgd loss is untargeted")
        return segpgd_loss(output, labels, progress, ignore_index)
    if loss != "ce":
        raise ValueError(f"loss must be one of {APGD_LOSSES}, got {loss!r}")
    kwargs = {"ignore_index": ignore_index} if output.dim() == 4 else {}
    ce = F.cross_entropy(output.float(), labels if targets is None else targets,
                         reduction="none", **kwargs)
    return _per_image(ce if targets is None else -ce, labels, ignore_index)


# ---------------------------------------------------------------------- schedule


def apgd_checkpoints(steps: int) -> list[int]:
    """Checkpoints ``w_j = ceil(p_j * steps)`` (``0 < w_j <= steps``, increasing) with
    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``.

    For 100 steps: ``[22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    points: list[int] = []
    prev, p = 0.0, 0.22
    while p <= 1.0:
        w = math.ceil(round(p * steps, 9))
        if w > (points[-1] if points else 0):
            points.append(w)
        prev, p = p, p + max(p - prev - 0.03, 0.06)
    return points


class StepSizeSchedule:
    """APGD's per-image step size ``eta (B,)`` and its checkpoint conditions.

    Call :meth:`record` with the loss ``(B,)`` after every step (the loss at the start
    point first) and :meth:`checkpoint` with the best loss so far after the step that ends
    at a checkpoint; the latter returns the mask ``(B,)`` of images whose ``eta`` it
    halved (those restart from their best point). An image is halved when

    1. its loss rose in fewer than ``rho * (w_j - w_{j-1})`` of the steps since the last
       checkpoint, or
    2. its ``eta`` was not halved at the last checkpoint and its best loss did not improve
       since then.

    Args:
        steps: number of steps ``N``.
        eta: initial step size per image ``(B,)``.
        rho: the fraction of condition 1 (0.75).
    """

    def __init__(self, steps: int, eta: Tensor, rho: float = 0.75) -> None:
        self.eta = eta.clone()
        self.rho = rho
        self.checkpoints = apgd_checkpoints(steps)
        self.last_checkpoint = 0
        self.increases = torch.zeros_like(eta)
        self.last_loss: Tensor | None = None
        self.best_at_checkpoint: Tensor | None = None
        self.halved = torch.zeros_like(eta, dtype=torch.bool)

    def record(self, loss: Tensor) -> None:
        """Count, per image, whether ``loss (B,)`` rose since the previous step."""
        loss = loss.detach()
        if self.last_loss is not None:
            self.increases += (loss > self.last_loss).to(self.increases.dtype)
        else:
            self.best_at_checkpoint = loss.clone()
        self.last_loss = loss

    def is_checkpoint(self, step: int) -> bool:
        """Whether ``step`` (the number of steps taken) is a checkpoint."""
        return step in self.checkpoints

    def checkpoint(self, step: int, best_loss: Tensor) -> Tensor:
        """Apply the conditions at checkpoint ``step``; returns the halved mask ``(B,)``."""
        assert self.best_at_checkpoint is not None, "record() the start loss first"
        span = step - self.last_checkpoint
        oscillating = self.increases < self.rho * span
        stalled = ~self.halved & (best_loss <= self.best_at_checkpoint)
        halve = oscillating | stalled
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        self.halved = halve
        self.best_at_checkpoint = best_loss.detach().clone()
        self.increases.zero_()
        self.last_checkpoint = step
        return halve


def keep_worst(best: tuple[Tensor, Tensor, Tensor] | None,
               new: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per image, the worse of two ``(images (B, ...), score (B,), objective (B,))``
    triples for the model: the lower score, ties broken by the higher objective."""
    if best is None:
        return new
    x, score, obj = new
    bx, bscore, bobj = best
    better = (score < bscore) | ((score == bscore) & (obj > bobj))
    mask = better.view((-1,) + (1,) * (x.dim() - 1))
    return torch.where(mask, x, bx), torch.where(better, score, bscore), \
        torch.where(better, obj, bobj)


def merge_worst(best: tuple[Tensor, Tensor, Tensor] | None, idx: Tensor,
                new: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`keep_worst` of ``best`` restricted to the images ``idx (n,)`` and ``new``
    (``n`` images), written back into a copy of ``best``; ``new`` itself when ``best`` is
    None (then ``idx`` must cover every image)."""
    if best is None:
        return new
    part = keep_worst((best[0][idx], best[1][idx], best[2][idx]), new)
    out = tuple(t.clone() for t in best)
    for full, value in zip(out, part):
        full[idx] = value
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------- attack


class APGD:
    """Auto-PGD (see the module docstring); call ``attack(images, labels)``.

    Images ``(B, C, H, W)`` in [0, 1], labels ``(B,)`` or ``(B, H, W)``. Returns detached
    adversarial images of the same shape in [0, 1] within the eps ball. Restarts run only
    on the images the previous ones did not fool completely (score > 0) and keep the
    per-image worst case of the attacked system (:meth:`score`).

    Args:
        model: a network or a defense (see :class:`~equivision.robust.attacks.IterativeAttack`).
        eps: radius of the ball (> 0).
        steps: iterations ``N`` per restart.
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"``, ``"dlr"`` or ``"segpgd"``.
        restarts: independent random starts.
        seed: seeds the starts and the EOT draws.
        ignore_index: ignored label (segmentation).
        through: gradient path through a defense (``plain``, ``model``, ``bpda``, ``full``).
        eot_samples: draws of a randomized defense averaged per gradient.
        lambda_e: weight of the adaptive equivariance term (needs a defense).
        rho: fraction of the oscillation condition.
        momentum: ``alpha`` of the momentum step (0.75).
        eval_mode: attack the model in eval mode and restore its modes afterwards
            (:func:`evaluating`); False runs it in the mode it is in.
    """

    def __init__(self, model: nn.Module, eps: float, steps: int = 100, norm: str = "linf",
                 loss: str = "ce", restarts: int = 1, seed: int = 0,
                 ignore_index: int = IGNORE_INDEX, through: str = "plain",
                 eot_samples: int = 1, lambda_e: float = 0.0, rho: float = 0.75,
                 momentum: float = 0.75, eval_mode: bool = True) -> None:
        if loss not in APGD_LOSSES:
            raise ValueError(f"{type(self).__name__}: loss must be one of {APGD_LOSSES}, got "
                             f"{loss!r}")
        for value, what in ((rho, "rho"), (momentum, "momentum")):
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(f"{type(self).__name__}: {what} must lie in (0, 1], got "
                                 f"{value!r}")
        self.core = IterativeAttack(model, eps, steps=steps, norm=norm, restarts=restarts,
                                    seed=seed, ignore_index=ignore_index, through=through,
                                    eot_samples=eot_samples, lambda_e=lambda_e)
        self.model, self.loss, self.rho, self.momentum = model, loss, float(rho), \
            float(momentum)
        self.eval_mode = bool(eval_mode)

    def __getattr__(self, name: str) -> Any:
        """Settings shared with the core (``eps``, ``steps``, ``norm``, ``seed``, ...)."""
        if name == "core":
            raise AttributeError(name)
        return getattr(self.core, name)

    def __repr__(self) -> str:
        keys = ("eps", "steps", "norm", "loss", "restarts", "through", "eot_samples",
                "lambda_e")
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    def score(self, x: Tensor, labels: Tensor, restart: int = 0) -> tuple[Tensor, Tensor]:
        """``(score, objective)`` ``(B,)`` of the attacked system at ``x`` (see
        :meth:`IterativeAttack.score`; the objective is its cross-entropy)."""
        return self.core.score(x, labels, restart)

    # ------------------------------------------------------------------ pieces

    def _evaluate(self, x: Tensor, labels: Tensor, targets: Tensor | None, restart: int,
                  step: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss (B,), grad (B, C, H, W), logits)`` at ``x``, averaged over the EOT draws."""
        core = self.core
        loss_sum = grad_sum = out_sum = None
        for k in range(core.eot_samples):
            xr = x.detach().requires_grad_(True)
            out = core._forward(xr, (restart, step, k))
            if step == 0 and k == 0:
                core._check_output(out, labels)
            obj = apgd_objective(out, labels, self.loss, targets, step / core.steps,
                                 core.ignore_index)
            if core.lambda_e > 0:
                obj = obj - core.lambda_e * core.defense.equivariance_loss(xr)
            (g,) = torch.autograd.grad(obj.sum(), xr)
            loss_sum = obj.detach() if loss_sum is None else loss_sum + obj.detach()
            grad_sum = g if grad_sum is None else grad_sum + g
            out_sum = out.detach() if out_sum is None else out_sum + out.detach()
        n = core.eot_samples
        assert loss_sum is not None and grad_sum is not None and out_sum is not None
        return loss_sum / n, grad_sum / n, out_sum / n

    def _project(self, x: Tensor, x0: Tensor) -> Tensor:
        if self.core.norm == "linf":
            delta = (x - x0).clamp(-self.core.eps, self.core.eps)
        else:
            delta = x - x0
            delta = delta * (self.core.eps / _flat_norm(delta, 2).clamp_min(_TINY)).clamp_max(1)
        return (x0 + delta).clamp(0.0, 1.0)

    def _direction(self, grad: Tensor) -> Tensor:
        if self.core.norm == "linf":
            return grad.sign()
        return grad / _flat_norm(grad, 2).clamp_min(_TINY)

    # ------------------------------------------------------------------ one run

    def run_once(self, x0: Tensor, labels: Tensor, restart: int, gen: torch.Generator,
                 targets: Tensor | None = None) -> Tensor:
        """One APGD run from a random start drawn from ``gen``; returns the best iterate
        ``(B, C, H, W)`` (lowest score on the gradient path's logits, ties: higher loss)."""
        core = self.core
        x = core._start(x0, gen)
        loss, grad, out = self._evaluate(x, labels, targets, restart, 0)
        shape = (-1,) + (1,) * (x.dim() - 1)
        schedule = StepSizeSchedule(core.steps, torch.full_like(loss, 2.0 * core.eps), self.rho)
        schedule.record(loss)
        x_max, grad_max, loss_max = x, grad, loss
        best = (x, per_image_score(out, labels, core.ignore_index).to(loss.dtype), loss)
        x_prev = x
        for step in range(1, core.steps + 1):
            z = self._project(x + schedule.eta.view(shape) * self._direction(grad), x0)
            a = 1.0 if step == 1 else self.momentum
            x_new = self._project(x + a * (z - x) + (1.0 - a) * (x - x_prev), x0)
            x_prev, x = x, x_new
            loss, grad, out = self._evaluate(x, labels, targets, restart, step)
            schedule.record(loss)
            up = loss > loss_max
            x_max = torch.where(up.view(shape), x, x_max)
            grad_max = torch.where(up.view(shape), grad, grad_max)
            loss_max = torch.where(up, loss, loss_max)
            score = per_image_score(out, labels, core.ignore_index).to(loss.dtype)
            best = keep_worst(best, (x, score, loss))
            if schedule.is_checkpoint(step) and step < core.steps:
                halve = schedule.checkpoint(step, loss_max).view(shape)
                x = torch.where(halve, x_max, x)
                x_prev = torch.where(halve, x_max, x_prev)
                grad = torch.where(halve, grad_max, grad)
        return best[0].detach()

    def attack_subset(self, x0: Tensor, labels: Tensor, targets: Tensor | None,
                      restart: int, gen: torch.Generator,
                      best: tuple[Tensor, Tensor, Tensor] | None,
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """Run one restart on the images not yet fully fooled in ``best`` and merge the
        result into it (per-image worst case); returns the new ``best`` triple."""
        active = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device) if best is None \
            else best[1] > 0
        if not bool(active.any()):
            assert best is not None
            return best
        idx = active.nonzero().squeeze(1)
        sub_t = None if targets is None else targets[idx]
        adv = self.run_once(x0[idx], labels[idx], restart, gen, sub_t)
        score, obj = self.score(adv, labels[idx], restart)
        return merge_worst(best, idx, (adv, score, obj))

    def clean(self, x0: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The starting worst case: ``(x0, score, objective)`` of the clean images (those
        already fooled, score 0, are not attacked)."""
        return (x0.clone(), *self.score(x0, labels))

    def runs(self, x0: Tensor) -> Iterator[tuple[Tensor | None, int]]:
        """The runs of one call: ``(targets or None, restart)`` pairs."""
        for r in range(self.core.restarts):
            yield None, r

    @torch.enable_grad()
    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        """Adversarial images ``(B, C, H, W)`` in [0, 1] (gradients are turned on inside)."""
        x0, labels = self.core._check_images(images, labels)
        gen = torch.Generator(device=x0.device).manual_seed(self.core.seed)
        with evaluating(self.model, self.eval_mode):
            best = self.clean(x0, labels)
            for targets, r in self.runs(x0):
                best = self.attack_subset(x0, labels, targets, r, gen, best)
        return best[0]


class APGDT(APGD):
    """APGD-T: targeted APGD (DLR loss by default) once per target class among the
    ``n_targets`` highest-scoring wrong classes of the clean prediction (per pixel for
    segmentation), each with ``restarts`` restarts; per image the worst case for the
    model's *untargeted* score (accuracy / mIoU against the true labels) is kept.

    Args:
        n_targets: number of target ranks (default 9, at most ``K - 1``).
        loss: ``"dlr"`` (targeted DLR) or ``"ce"`` (minus the CE to the target).
        **kwargs: as :class:`APGD`.
    """

    def __init__(self, model: nn.Module, eps: float, n_targets: int = 9, loss: str = "dlr",
                 **kwargs: Any) -> None:
        if loss not in ("dlr", "ce"):
            raise ValueError(f"APGDT: loss must be 'dlr' or 'ce', got {loss!r}")
        if isinstance(n_targets, bool) or not isinstance(n_targets, int) or n_targets < 1:
            raise ValueError(f"APGDT: n_targets must be an integer >= 1, got {n_targets!r}")
        super().__init__(model, eps, loss=loss, **kwargs)
        self.n_targets = n_targets

    def targets(self, x0: Tensor) -> Tensor:
        """Classes ranked by the attacked system's clean logits, ``(B, K)`` /
        ``(B, K, H, W)``: index ``[:, r]`` is the target of rank ``r`` (1 = runner-up)."""
        return self.core.predict(x0).sort(dim=1, descending=True).indices

    def runs(self, x0: Tensor) -> Iterator[tuple[Tensor | None, int]]:
        """One run per target rank ``1..min(n_targets, K - 1)`` and restart."""
        order = self.targets(x0)
        for rank in range(1, min(self.n_targets, order.shape[1] - 1) + 1):
            for r in range(self.core.restarts):
                yield order[:, rank], r
