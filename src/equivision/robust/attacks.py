"""Gradient attacks for classifiers and segmenters, and for models behind a purifying defense.

Every attack is one configuration of :class:`IterativeAttack`, a projected-gradient core
with four independent choices:

* the **step rule**: sign steps (``norm="linf"``) or L2-normalised steps (``norm="l2"``),
  optionally with momentum on the L1-normalised gradient (``decay > 0``, MIM);
* the **objective** (``loss``): cross-entropy (``"ce"``), the Carlini-Wagner margin
  (``"cw"``) or Houdini's probit surrogate of the task loss (``"houdini"``), computed per
  image (mean over the valid pixels for segmentation, ``ignore_index`` excluded);
* the **gradient path** (``through``) when the model is a defense (an ``nn.Module`` with
  ``.model``, ``.randomized``, ``.purify(x, generator=None, differentiable=False)`` and
  ``.equivariance_loss(x)``):

  - ``"plain"``: differentiate ``model(x)`` as it is (for a defense: whatever autograd
    makes of its forward);
  - ``"model"``: attack the wrapped network ``defense.model(x)``, skipping the purifier
    (the paper's adaptive attack and transfer attacks);
  - ``"bpda"``: forward through ``purify`` without a graph, backward as the identity
    (``x + (purify(x) - x).detach()``, Athalye et al. 2018);
  - ``"full"``: backpropagate through the unrolled purifier
    (``purify(x, differentiable=True)``);

  with ``eot_samples`` draws of the defense's randomness per step (EOT: each draw gets its
  own ``torch.Generator`` seeded from ``(seed, restart, step, draw)``, the gradients are
  averaged);
* the **adaptive term**: ``lambda_e > 0`` maximises
  ``L_task(x + delta) - lambda_e * defense.equivariance_loss(x + delta)``: the
  equivariance loss is evaluated on the *perturbed* input, so it shapes ``delta``.

:class:`FGSM`, :class:`IFGSM` (:data:`BIM`), :class:`PGD`, :class:`MIM`, :class:`CW`,
:class:`Houdini`, :class:`BPDA`, :class:`FullGradient` and :class:`Adaptive` only change
defaults. :func:`sweep_lambda` runs the adaptive attack for several ``lambda_e`` and keeps
the worst case per image.

Example::

    adv = PGD(model, eps=8 / 255, steps=20, restarts=2)(images, labels)
    adv = BPDA(defense, eps=8 / 255, steps=50, eot_samples=4)(images, labels)
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..metrics import IGNORE_INDEX, check_output_labels, per_image_score, task_loss
from ..utils import evaluating

__all__ = [
    "LOSSES",
    "NORMS",
    "THROUGH",
    "Adaptive",
    "BIM",
    "BPDA",
    "CW",
    "FGSM",
    "FullGradient",
    "Houdini",
    "IFGSM",
    "IterativeAttack",
    "MIM",
    "PGD",
    "SweepResult",
    "attack_objective",
    "evaluating",
    "is_defense",
    "sweep_lambda",
]

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw", "houdini")
THROUGH = ("plain", "model", "bpda", "full")
_TINY = 1e-12


def is_defense(model: Any) -> bool:
    """True when ``model`` has the defense interface (``model``, ``purify``,
    ``equivariance_loss``)."""
    return all(hasattr(model, a) for a in ("model", "purify", "equivariance_loss"))


def _per_image(values: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Per-pixel values ``(B, H, W)`` -> mean over each image's valid pixels ``(B,)``;
    ``(B,)`` values are returned unchanged."""
    if values.dim() == 1:
        return values
    valid = (labels != ignore_index).flatten(1)
    return (values.flatten(1) * valid).sum(1) / valid.sum(1).clamp_min(1)


def _margin(output: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``z_y - max_{j != y} z_j`` per image (B,) or pixel (B, H, W) (ignored pixels: 0)."""
    safe = labels.masked_fill(labels == ignore_index, 0) if output.dim() == 4 else labels
    z = output.float()
    z_y = z.gather(1, safe.unsqueeze(1)).squeeze(1)
    others = z.scatter(1, safe.unsqueeze(1), float("-inf"))
    return z_y - others.amax(1)


def attack_objective(output: Tensor, labels: Tensor, loss: str = "ce", targeted: bool = False,
                     kappa: float = 0.0, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The per-image quantity ``(B,)`` an attack maximises.

    Args:
        output: logits ``(B, K)`` or ``(B, K, H, W)``.
        labels: true labels ``(B,)`` / ``(B, H, W)``, or the target labels when ``targeted``.
        loss: ``"ce"``: cross-entropy (negated when targeted);
            ``"cw"``: the Carlini-Wagner margin ``min(max_{j!=y} z_j - z_y, kappa)``
            (targeted: ``min(z_t - max_{j!=t} z_j, kappa)``), per pixel for segmentation;
            ``"houdini"``: Houdini (Cisse et al. 2017), ``(1 - Phi(g_y - g_yhat)) * l``
            per pixel (per image for classification) with the standard normal CDF ``Phi``,
            ``g_yhat`` the strongest class other than ``y`` and the task loss ``l`` of
            predicting ``yhat`` instead of ``y``, which is 1 for the 0-1 loss of a pixel
            (mIoU and pixel accuracy both drop when a pixel flips). Where the model is wrong,
            ``yhat`` is its prediction, exactly as in Houdini; where it is right, Houdini's
            own ``yhat = argmax = y`` has zero task loss and zero gradient, so the runner-up
            class is used instead (the pixel whose flip is nearest). The mean over the valid
            pixels is the expected pixel error under Gaussian noise on the margins.
            Targeted: ``-(1 - Phi(g_t - max_{j!=t} g_j))``.
        targeted: whether ``labels`` are targets to reach.
        kappa: CW confidence.
        ignore_index: label of ignored pixels (segmentation).
    """
    if loss == "ce":
        value = task_loss(output, labels, ignore_index)
        return -value if targeted else value
    margin = _margin(output, labels, ignore_index)  # z_y - best other
    if loss == "cw":
        per = (margin if targeted else -margin).clamp_max(kappa)
    elif loss == "houdini":
        return _houdini(margin, labels, targeted, ignore_index)
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return _per_image(per, labels, ignore_index)


def _houdini(margin: Tensor, labels: Tensor, targeted: bool, ignore_index: int) -> Tensor:
    """Houdini's per-image value ``(B,)`` from margins ``(B,)`` / ``(B, H, W)``, with a
    gradient that does not underflow.

    The value is ``E = mean Phi(-m)`` over the valid pixels (targeted: ``mean Phi(m) - 1``).
    On a confident model ``Phi(-m)`` and its derivative underflow (float32 ``erf`` gives
    exactly 0 gradient beyond ``m ~ 13``), so the value is computed in float64 log-space
    (``log_ndtr``, ``logsumexp`` over pixels) and its gradient is that of ``log E``: per
    image the same direction as the gradient of ``E`` (a positive rescaling), but finite
    and non-zero at any margin.
    """
    log_p = torch.special.log_ndtr(margin.double() if targeted else -margin.double())
    if log_p.dim() == 1:
        log_e = log_p
        count = torch.ones_like(log_p)
    else:
        valid = (labels != ignore_index).flatten(1)
        count = valid.sum(1).to(log_p.dtype)
        flat = log_p.flatten(1).masked_fill(~valid, float("-inf"))
        flat = flat.masked_fill((count == 0).unsqueeze(1), 0.0)  # no valid pixel: no NaN
        log_e = torch.logsumexp(flat, 1) - count.clamp_min(1).log()
    value = log_e.exp() - 1.0 if targeted else log_e.exp()
    surrogate = value.detach() + (log_e - log_e.detach())
    return torch.where(count > 0, surrogate, torch.zeros_like(surrogate)).to(margin.dtype)


def _derived_seed(*parts: Any) -> int:
    key = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _flat_norm(t: Tensor, p: int) -> Tensor:
    """Per-image norm ``(B, 1, 1, ...)`` broadcastable against ``t``."""
    shape = (t.shape[0],) + (1,) * (t.dim() - 1)
    return t.flatten(1).norm(p=p, dim=1).view(shape)


class IterativeAttack:
    """Projected gradient ascent on an attack objective; the core of every attack here.

    Call ``attack(images, labels)`` with images ``(B, C, H, W)`` in ``[0, 1]`` and labels
    ``(B,)`` (classification) or ``(B, H, W)`` (segmentation; pixels equal to
    ``ignore_index`` are ignored), or target labels when ``targeted``. Returns detached
    adversarial images of the same shape in ``[0, 1]`` within the ``eps`` ball.

    A call attacks the model in eval mode and leaves it exactly as found: each submodule's
    own mode is restored and no buffer changes (BatchNorm statistics; :func:`evaluating`),
    unless ``eval_mode=False``. No parameter gradient is accumulated: gradients are taken
    with respect to the input only. The pieces (:meth:`predict`, :meth:`score`,
    :meth:`run_once`) run the model in the mode it is in (APGD and Square call them inside
    their own :func:`evaluating` block).

    Args:
        model: a network mapping ``(B, C, H, W)`` in [0, 1] to logits ``(B, K)`` or
            ``(B, K, H, W)``, or a defense (see the module docstring).
        eps: radius of the perturbation ball (> 0), in [0, 1] pixel units.
        alpha: step size (default ``2.5 * eps / steps``).
        steps: number of gradient steps.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start at a uniform random point of the eps ball.
        restarts: independent runs; per image the worst case is kept (lowest accuracy or
            per-image mIoU of the attacked model, ties broken by the higher objective).
        targeted: labels are targets; the attack drives the predictions to them.
        seed: seeds the random start and the defense's randomness (EOT draws): equal seeds
            give equal results.
        ignore_index: label of ignored pixels in segmentation.
        loss: ``"ce"``, ``"cw"`` or ``"houdini"`` (see :func:`attack_objective`).
        kappa: CW confidence margin.
        decay: momentum decay ``mu`` of MIM (0: no momentum).
        through: gradient path through a defense: ``"plain"``, ``"model"``, ``"bpda"`` or
            ``"full"``.
        eot_samples: draws of the defense's randomness averaged per gradient (EOT).
        lambda_e: weight of the adaptive equivariance term (needs a defense).
        eval_mode: attack in eval mode and restore the modes afterwards; False runs the
            model in the mode it is in.
        best_iterate: return, per image and run, the best iterate instead of the last:
            the lowest per-image score (accuracy or mIoU) along the attack's own forward
            path, ties broken by the higher objective (the first success that stays the
            strongest). The scores of iterates ``0..steps-1`` come from the forward pass of
            their gradient (EOT draw 0, objective averaged over the draws); the last
            iterate costs one more forward pass, on the images not yet at the lowest
            score only (an image fooled earlier keeps that iterate).

    Raises:
        ValueError: bad settings; at call time images outside [0, 1], labels that do not
            fit the model output, or a model output that is not finite.
    """

    default_random_start = True

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool | None = None,
        restarts: int = 1,
        targeted: bool = False,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
        loss: str = "ce",
        kappa: float = 0.0,
        decay: float = 0.0,
        through: str = "plain",
        eot_samples: int = 1,
        lambda_e: float = 0.0,
        eval_mode: bool = True,
        best_iterate: bool = True,
    ) -> None:
        name = type(self).__name__

        def number(value: Any, what: str, positive: bool) -> float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) and (value > 0 if positive else value >= 0)
            if not ok:
                rule = "> 0" if positive else ">= 0"
                raise ValueError(f"{name}: {what} must be a finite number {rule}, got {value!r}")
            return float(value)

        def integer(value: Any, what: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {what} must be an integer >= 1, got {value!r}")
            return value

        if not callable(model):
            raise TypeError(f"{name}: model must be callable (an nn.Module), got "
                            f"{type(model).__name__}")
        self.model = model
        self.eps = number(eps, "eps", True)
        self.steps = integer(steps, "steps")
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else number(alpha, "alpha",
                                                                               True)
        if norm not in NORMS:
            raise ValueError(f"{name}: norm must be one of {NORMS}, got {norm!r}")
        if loss not in LOSSES:
            raise ValueError(f"{name}: loss must be one of {LOSSES}, got {loss!r}")
        if through not in THROUGH:
            raise ValueError(f"{name}: through must be one of {THROUGH}, got {through!r}")
        self.norm, self.loss, self.through = norm, loss, through
        self.random_start = self.default_random_start if random_start is None \
            else bool(random_start)
        self.restarts = integer(restarts, "restarts")
        self.targeted = bool(targeted)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{name}: seed must be an integer, got {seed!r}")
        self.seed = seed
        self.ignore_index = int(ignore_index)
        self.kappa = number(kappa, "kappa", False)
        self.decay = number(decay, "decay", False)
        self.eot_samples = integer(eot_samples, "eot_samples")
        self.lambda_e = number(lambda_e, "lambda_e", False)
        self.eval_mode = bool(eval_mode)
        self.best_iterate = bool(best_iterate)
        self.defense = model if is_defense(model) else None
        if self.defense is None and (through != "plain" or self.lambda_e > 0):
            what = f"through={through!r}" if through != "plain" else "lambda_e > 0"
            raise ValueError(
                f"{name}: {what} needs a defense (an object with .model, .purify and "
                f".equivariance_loss), got {type(model).__name__}; use through='plain' and "
                "lambda_e=0 for an undefended model"
            )
        if self.eot_samples > 1 and not getattr(self.defense, "randomized", False):
            warnings.warn(f"{name}: eot_samples={self.eot_samples} with a deterministic model "
                          "repeats identical gradients", stacklevel=2)

    def __repr__(self) -> str:
        keys = ("eps", "alpha", "steps", "norm", "random_start", "restarts", "targeted", "loss",
                "decay", "through", "eot_samples", "lambda_e", "eval_mode", "best_iterate")
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    # ------------------------------------------------------------------ forward paths

    def _generator(self, device: torch.device, *parts: Any) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(_derived_seed(self.seed, *parts))

    def _forward(self, x: Tensor, draw: tuple[Any, ...]) -> Tensor:
        """Logits of ``x`` along the configured gradient path (graph kept to ``x``)."""
        if self.through == "plain":
            return self.model(x)
        d = self.defense
        assert d is not None
        if self.through == "model":
            return d.model(x)
        gen = self._generator(x.device, *draw)
        if self.through == "bpda":
            with torch.enable_grad():
                purified = d.purify(x.detach(), generator=gen)
            return d.model(x + (purified.detach() - x).detach())
        return d.model(d.purify(x, generator=gen, differentiable=True))

    @torch.enable_grad()  # a purifier takes gradients even when the caller does not
    def predict(self, x: Tensor, restart: int = 0) -> Tensor:
        """Logits (no graph) of the attacked system: a defense purifies (one draw seeded
        from ``(seed, restart, "eval")``) before its model; other models run as they are."""
        d = self.defense
        if d is None:
            with torch.no_grad():
                return self.model(x)
        purified = d.purify(x, generator=self._generator(x.device, restart, "eval"))
        with torch.no_grad():
            return d.model(purified.detach())

    def score(self, x: Tensor, labels: Tensor, restart: int = 0) -> tuple[Tensor, Tensor]:
        """``(score, objective)``, each ``(B,)``: the attacked system's per-image accuracy
        or mIoU (:func:`~equivision.metrics.per_image_score`; lower = stronger
        attack) and the attack objective at ``x``."""
        out = self.predict(x, restart)
        self._check_output(out, labels)
        obj = attack_objective(out, labels, self.loss, self.targeted, self.kappa,
                               self.ignore_index)
        return per_image_score(out, labels, self.ignore_index, self.targeted), obj.double()

    # ------------------------------------------------------------------ pieces

    def _check_output(self, out: Any, labels: Tensor) -> None:
        if not isinstance(out, Tensor):
            raise ValueError(f"the model must return a tensor of logits, got "
                             f"{type(out).__name__}; pick them with --output-key KEY (Python: "
                             "equivision.robust.select_output(model, KEY))")
        check_output_labels(out, labels, self.ignore_index)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("the model returned NaN or infinite logits; check the model and "
                             "its input range (the attack feeds images in [0, 1])")

    def _gradient(self, x: Tensor, labels: Tensor, restart: int, step: int,
                  check: bool) -> Tensor:
        """Gradient ``(B, C, H, W)`` of the objective summed over images (EOT-averaged)."""
        return self._gradient_and_value(x, labels, restart, step, check)[0]

    def _gradient_and_value(self, x: Tensor, labels: Tensor, restart: int, step: int,
                            check: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``(gradient (B, C, H, W), output of draw 0, objective (B,))``: the gradient of
        the objective summed over images and the per-image objective (with the adaptive
        term), both averaged over the EOT draws."""
        total: Tensor | None = None
        first: Tensor | None = None
        task: Tensor | None = None
        for k in range(self.eot_samples):
            xr = x.detach().requires_grad_(True)
            out = self._forward(xr, (restart, step, k))
            if check and k == 0:
                self._check_output(out, labels)
            obj = attack_objective(out, labels, self.loss, self.targeted, self.kappa,
                                   self.ignore_index)
            if self.lambda_e > 0:
                assert self.defense is not None
                obj = obj - self.lambda_e * self.defense.equivariance_loss(xr)
            task = obj.detach() if task is None else task + obj.detach()
            (g,) = torch.autograd.grad(obj.sum(), xr)
            total = g if total is None else total.add_(g)
            first = out.detach() if first is None else first
        assert total is not None and first is not None and task is not None
        if self.eot_samples == 1:
            return total, first, task
        return total.div_(self.eot_samples), first, task / self.eot_samples

    def _value(self, x: Tensor, labels: Tensor, restart: int, step: int
               ) -> tuple[Tensor, Tensor]:
        """``(output, objective (B,))`` at ``x`` along the attack's path (draw 0; the
        objective with the adaptive term), detached."""
        if self.defense is None:  # no graph: the activations are freed as they go
            with torch.no_grad():
                out = self.model(x.detach())
            return out, attack_objective(out, labels, self.loss, self.targeted, self.kappa,
                                         self.ignore_index)
        with torch.enable_grad():  # a purifier takes gradients of its own
            xr = x.detach().requires_grad_(self.through == "full")
            out = self._forward(xr, (restart, step, 0)).detach()
            obj = attack_objective(out, labels, self.loss, self.targeted, self.kappa,
                                   self.ignore_index)
            if self.lambda_e > 0:
                assert self.defense is not None
                obj = obj - self.lambda_e * self.defense.equivariance_loss(x.detach()).detach()
        return out, obj

    def _keep_best(self, best: tuple[Tensor, Tensor, Tensor] | None, x: Tensor, out: Tensor,
                   obj: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image the better of ``best = (images, score, objective)`` and the iterate
        ``x`` with its output and objective: lower score, ties the higher objective (ties
        of both keep the later iterate). ``best``'s images are updated in place."""
        score = per_image_score(out, labels, self.ignore_index, self.targeted)
        obj = obj.double()
        if best is None:
            return x.detach().clone(), score, obj
        better = (score < best[1]) | ((score == best[1]) & (obj >= best[2]))
        shape = (-1,) + (1,) * (x.dim() - 1)
        images = torch.where(better.view(shape), x.detach(), best[0], out=best[0])
        return images, torch.where(better, score, best[1]), torch.where(better, obj, best[2])

    def _best_with_last(self, best: tuple[Tensor, Tensor, Tensor], x: Tensor, labels: Tensor,
                        restart: int) -> Tensor:
        """The best iterate ``(B, C, H, W)`` once the last iterate ``x`` is scored. Images
        already at the lowest score (0: fooled, or no pixel left right) keep their best
        iterate unscored against the last one, so the last forward pass runs only on the
        others: on none when every image is fooled. (Only an undefended model in eval mode
        runs on a subset; a defense's draws are per batch, so it scores the whole batch.)"""
        open_ = best[1] > 0
        if not bool(open_.any()):
            return best[0]
        if bool(open_.all()) or self.defense is not None or not self.eval_mode:
            out, obj = self._value(x, labels, restart, self.steps)
            return self._keep_best(best, x, out, obj, labels)[0]
        idx = open_.nonzero().squeeze(1)
        out, obj = self._value(x[idx], labels[idx], restart, self.steps)
        sub = self._keep_best((best[0][idx], best[1][idx], best[2][idx]), x[idx], out, obj,
                              labels[idx])
        return best[0].index_copy_(0, idx, sub[0])

    def _start(self, x0: Tensor, gen: torch.Generator) -> Tensor:
        if not self.random_start:
            return x0.clone()
        if self.norm == "linf":
            delta = torch.empty_like(x0).uniform_(-self.eps, self.eps, generator=gen)
        else:  # uniform in the L2 ball: uniform direction, radius eps * U^(1/d)
            direction = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            direction = direction / _flat_norm(direction, 2).clamp_min(_TINY)
            u = torch.rand((x0.shape[0],) + (1,) * (x0.dim() - 1), generator=gen,
                           device=x0.device, dtype=x0.dtype)
            delta = direction * self.eps * u.pow(1.0 / x0[0].numel())
        return (x0 + delta).clamp_(0.0, 1.0)

    def _step(self, x: Tensor, x0: Tensor, grad: Tensor, inplace: bool = False) -> Tensor:
        """One projected step from ``x`` along ``grad`` (both ``(B, C, H, W)``). With
        ``inplace`` the step overwrites ``x`` and ``grad`` (no allocation per step; the
        numbers are the same)."""
        if self.norm == "linf":
            if not inplace:
                x = x + self.alpha * grad.sign()
                delta = (x - x0).clamp_(-self.eps, self.eps)
                return (x0 + delta).clamp_(0.0, 1.0)
            x.add_(grad.sign_(), alpha=self.alpha)
            return x.sub_(x0).clamp_(-self.eps, self.eps).add_(x0).clamp_(0.0, 1.0)
        x = x + self.alpha * grad / _flat_norm(grad, 2).clamp_min(_TINY)
        delta = x - x0
        delta = delta * (self.eps / _flat_norm(delta, 2).clamp_min(_TINY)).clamp_max(1.0)
        return (x0 + delta).clamp_(0.0, 1.0)

    def _check_images(self, images: Any, labels: Any) -> tuple[Tensor, Tensor]:
        name = type(self).__name__
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"{name}: images must be a float tensor (B, C, H, W), got "
                             f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
        if not isinstance(labels, Tensor):
            raise ValueError(f"{name}: labels must be a tensor, got {type(labels).__name__}")
        if images.numel() == 0:
            raise ValueError(f"{name}: images are empty: {tuple(images.shape)}")
        lo, hi = float(images.min()), float(images.max())
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(
                f"{name}: images must lie in [0, 1], got values in [{lo:g}, {hi:g}]; attack "
                "unnormalized images and put the normalization inside the model "
                "(equivision.robust.wrappers.Normalize)"
            )
        return images.detach(), labels.to(images.device)

    # ------------------------------------------------------------------ the attack

    def run_once(self, x0: Tensor, labels: Tensor, restart: int, gen: torch.Generator,
                 check: bool = True) -> Tensor:
        """One run (no restarts) from the start drawn from ``gen``; returns ``(B, C, H, W)``:
        the last iterate, or per image the best one (``best_iterate``)."""
        x = self._start(x0, gen)
        momentum = torch.zeros_like(x0) if self.decay > 0 else None
        best = None
        for step in range(self.steps):
            grad, out, obj = self._gradient_and_value(x, labels, restart, step,
                                                      check and step == 0)
            if self.best_iterate:
                best = self._keep_best(best, x, out, obj, labels)
            if momentum is not None:
                momentum = self.decay * momentum + grad / _flat_norm(grad, 1).clamp_min(_TINY)
                grad = momentum
            # the iterate is fresh (the start or a step's result): step it in place
            x = self._step(x, x0, grad, inplace=momentum is None)
        if best is None:
            return x.detach()
        return self._best_with_last(best, x, labels, restart)

    @torch.enable_grad()
    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        """Adversarial images ``(B, C, H, W)`` in [0, 1] for ``images`` with ``labels``
        (also inside ``torch.no_grad()``: the attack turns gradients on for itself)."""
        x0, labels = self._check_images(images, labels)
        with evaluating(self.model, self.eval_mode):
            return self._restarts(x0, labels)

    def _restarts(self, x0: Tensor, labels: Tensor) -> Tensor:
        """All restarts; per image the worst case ``(B, C, H, W)``."""
        gen = torch.Generator(device=x0.device).manual_seed(self.seed)
        best: Tensor | None = None
        best_score = best_obj = None
        for r in range(self.restarts):
            x = self.run_once(x0, labels, r, gen, check=r == 0)
            if self.restarts == 1:
                return x
            score, obj = self.score(x, labels, r)
            if best is None:
                best, best_score, best_obj = x, score, obj
                continue
            assert best_score is not None and best_obj is not None
            better = (score < best_score) | ((score == best_score) & (obj > best_obj))
            shape = (-1,) + (1,) * (x.dim() - 1)
            best = torch.where(better.view(shape), x, best)
            best_score = torch.where(better, score, best_score)
            best_obj = torch.where(better, obj, best_obj)
        assert best is not None
        return best


class FGSM(IterativeAttack):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size ``eps``."""

    default_random_start = False

    def __init__(self, model: nn.Module, eps: float, **kwargs: Any) -> None:
        kwargs.setdefault("alpha", eps)
        kwargs.setdefault("steps", 1)
        super().__init__(model, eps, **kwargs)


class IFGSM(IterativeAttack):
    """Iterative FGSM / BIM (Kurakin et al. 2017): PGD without a random start."""

    default_random_start = False


BIM = IFGSM


class PGD(IterativeAttack):
    """Projected gradient descent (Madry et al. 2018) with a uniform random start."""


class MIM(IterativeAttack):
    """Momentum iterative method (Dong et al. 2018): momentum ``decay`` (mu, default 1.0)
    on the L1-normalised gradient; no random start by default."""

    default_random_start = False

    def __init__(self, model: nn.Module, eps: float, decay: float = 1.0, **kwargs: Any) -> None:
        super().__init__(model, eps, decay=decay, **kwargs)


class CW(IterativeAttack):
    """Carlini-Wagner margin loss (confidence ``kappa``) optimised with PGD steps in the
    eps ball; per pixel for segmentation."""

    def __init__(self, model: nn.Module, eps: float, kappa: float = 0.0, **kwargs: Any) -> None:
        super().__init__(model, eps, loss="cw", kappa=kappa, **kwargs)


class Houdini(IterativeAttack):
    """PGD on Houdini's probit surrogate of the task loss (see :func:`attack_objective`)."""

    def __init__(self, model: nn.Module, eps: float, **kwargs: Any) -> None:
        super().__init__(model, eps, loss="houdini", **kwargs)


class BPDA(IterativeAttack):
    """PGD through a defense with the purifier's backward replaced by the identity; pass
    ``eot_samples > 1`` for BPDA+EOT against a randomized defense."""

    def __init__(self, defense: nn.Module, eps: float, **kwargs: Any) -> None:
        kwargs.setdefault("through", "bpda")
        super().__init__(defense, eps, **kwargs)


class FullGradient(IterativeAttack):
    """PGD backpropagating through the unrolled purifier (``differentiable=True``);
    combine with ``eot_samples`` for EOT."""

    def __init__(self, defense: nn.Module, eps: float, **kwargs: Any) -> None:
        kwargs.setdefault("through", "full")
        super().__init__(defense, eps, **kwargs)


class Adaptive(IterativeAttack):
    """The adaptive attack: maximise ``L_task - lambda_e * L_equi(x + delta)``.

    By default the task loss is that of the wrapped network (``through="model"``, the
    purifier skipped, as in the paper); ``through="bpda"`` or ``"full"`` combine the
    adaptive term with the other gradient paths.
    """

    def __init__(self, defense: nn.Module, eps: float, lambda_e: float = 1.0,
                 **kwargs: Any) -> None:
        kwargs.setdefault("through", "model")
        super().__init__(defense, eps, lambda_e=lambda_e, **kwargs)


@dataclass
class SweepResult:
    """Worst case of :func:`sweep_lambda` per image.

    Attributes:
        images: adversarial images ``(B, C, H, W)``.
        lambda_e: the ``lambda_e`` that produced each image ``(B,)``.
        score: the defended model's per-image accuracy / mIoU on them ``(B,)``.
        scores: ``{lambda_e: (B,) score}`` of every run.
    """

    images: Tensor
    lambda_e: Tensor
    score: Tensor
    scores: dict[float, Tensor]


def sweep_lambda(defense: nn.Module, images: Tensor, labels: Tensor,
                 lambdas: Sequence[float] = (0.0, 1.0, 10.0, 100.0, 1000.0),
                 eps: float = 8 / 255, attack: type[IterativeAttack] = Adaptive,
                 **kwargs: Any) -> SweepResult:
    """Run ``attack(defense, eps, lambda_e=l, **kwargs)`` for every ``l`` in ``lambdas`` and
    keep, per image, the adversarial image on which the *defended* model does worst.

    Returns:
        :class:`SweepResult` with images ``(B, C, H, W)``, the chosen ``lambda_e (B,)`` and
        the per-image scores.
    """
    if not lambdas:
        raise ValueError("lambdas must hold at least one value")
    best = best_score = best_obj = chosen = None
    scores: dict[float, Tensor] = {}
    for lam in lambdas:
        atk = attack(defense, eps, lambda_e=float(lam), **kwargs)
        adv = atk(images, labels)
        with evaluating(defense, atk.eval_mode):
            score, obj = atk.score(adv, labels.to(adv.device))
        scores[float(lam)] = score
        lam_t = torch.full_like(score, float(lam))
        if best is None:
            best, best_score, best_obj, chosen = adv, score, obj, lam_t
            continue
        assert best_score is not None and best_obj is not None and chosen is not None
        better = (score < best_score) | ((score == best_score) & (obj > best_obj))
        best = torch.where(better.view((-1,) + (1,) * (adv.dim() - 1)), adv, best)
        best_score = torch.where(better, score, best_score)
        best_obj = torch.where(better, obj, best_obj)
        chosen = torch.where(better, lam_t, chosen)
    assert best is not None and best_score is not None and chosen is not None
    return SweepResult(best, chosen, best_score, scores)
