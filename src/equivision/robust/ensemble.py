"""An AutoAttack-style ensemble: APGD-CE, APGD-T and Square in sequence, per-image worst case.

Each stage attacks, from the clean images, only the images on which the attacked system is
still not fully fooled (score > 0: still classified right, or per-image mIoU > 0) and the
per-image worst case over the stages is kept: an image counts as robust only if it
survives every stage (the AND over stages). FAB is left out.

Versions (:data:`VERSIONS`):

* ``"standard"``: APGD-CE (``steps``, ``restarts``), APGD-T (targeted DLR over the
  ``n_targets`` top classes) and Square (``queries``);
* ``"rand"``: for randomized defenses, APGD-CE and APGD-DLR with ``eot_samples`` EOT
  draws per gradient (default 20) and ``restarts`` (default 2);
* ``"seg"``: for segmentation, APGD-CE, APGD with the SegPGD loss, APGD-T and Square; the
  result also gives the dataset mIoU and pixel accuracy of the worst-case images.

For a randomized defense every score is the minimum over ``eval_draws`` seeded draws.

Example::

    result = AutoAttackEnsemble(model, eps=8 / 255)(images, labels)
    print(result.summary())
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..metrics import IGNORE_INDEX, miou, pixel_accuracy
from .apgd import APGD, APGDT, evaluating, merge_worst
from .attacks import IterativeAttack
from .square import Square

__all__ = ["VERSIONS", "AutoAttackEnsemble", "EnsembleAttack", "EnsembleResult", "StageResult"]

VERSIONS = ("standard", "rand", "seg")


@dataclass
class StageResult:
    """One stage of the ensemble.

    Attributes:
        name: the stage's name (``"clean"``, ``"apgd-ce"``, ...).
        score: per-image worst-case score ``(B,)`` after this stage (cumulative).
        attacked: number of images the stage attacked.
        seconds: wall time of the stage.
    """

    name: str
    score: Tensor
    attacked: int
    seconds: float

    @property
    def robust(self) -> float:
        """Mean score after the stage: robust accuracy (classification) or mean
        per-image mIoU (segmentation)."""
        return float(self.score.double().mean())


@dataclass
class EnsembleResult:
    """The ensemble's per-image worst case.

    Attributes:
        images: worst-case adversarial images ``(B, C, H, W)``.
        labels: the labels ``(B,)`` / ``(B, H, W)``.
        score: final per-image score ``(B,)`` float64 (1/0 correct, or per-image mIoU).
        stages: the clean evaluation and every attack stage, in order.
        worst_stage: index into :attr:`stages` of the stage that produced each image's
            worst case ``(B,)`` (0: the clean image).
        predictions: the attacked system's class predictions on :attr:`images`
            ``(B,)`` / ``(B, H, W)``.
        num_classes: number of model outputs ``K``.
        ignore_index: ignored label of segmentation.
    """

    images: Tensor
    labels: Tensor
    score: Tensor
    stages: list[StageResult]
    worst_stage: Tensor
    predictions: Tensor
    num_classes: int
    ignore_index: int = IGNORE_INDEX
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def segmentation(self) -> bool:
        """Whether the outputs were dense maps."""
        return self.labels.dim() == 3

    @property
    def robust(self) -> Tensor:
        """Per-image boolean ``(B,)``: not fooled by any stage (score > 0)."""
        return self.score > 0

    def robust_accuracy(self) -> float:
        """Mean final score: robust accuracy, or mean per-image mIoU for segmentation."""
        return float(self.score.double().mean())

    def dataset_miou(self) -> float:
        """Dataset mIoU of the worst-case predictions (segmentation; classification: the
        mIoU of the class predictions)."""
        return miou(self.predictions, self.labels, self.num_classes, self.ignore_index)

    def pixel_accuracy(self) -> float:
        """Fraction of valid pixels (images) predicted right on the worst-case images."""
        return pixel_accuracy(self.predictions, self.labels, self.ignore_index)

    def records(self) -> list[dict[str, Any]]:
        """One row per image for JSON/CSV: ``index``, ``score``, ``robust``,
        ``worst_stage`` (name) and the score after each stage (``score_<stage>``)."""
        names = [s.name for s in self.stages]
        per_stage = torch.stack([s.score.double() for s in self.stages], 1).tolist()
        return [{"index": i, "score": float(score), "robust": bool(score > 0),
                 "worst_stage": names[int(w)],
                 **{f"score_{n}": v for n, v in zip(names, row)}}
                for i, (score, w, row) in enumerate(zip(self.score.tolist(),
                                                        self.worst_stage.tolist(), per_stage))]

    def summary(self) -> str:
        """One line per stage: the robust accuracy / mIoU after it, images attacked, time."""
        what = "mean per-image mIoU" if self.segmentation else "robust accuracy"
        lines = [f"{s.name:>12}: {what} {s.robust:.4f} (attacked {s.attacked}, "
                 f"{s.seconds:.1f} s)" for s in self.stages]
        if self.segmentation:
            lines.append(f"{'worst case':>12}: dataset mIoU {self.dataset_miou():.4f}, "
                         f"pixel accuracy {self.pixel_accuracy():.4f}")
        return "\n".join(lines)


Attack = Callable[[Tensor, Tensor], Tensor]


class AutoAttackEnsemble:
    """Run attacks in sequence on the images still not fooled; keep the per-image worst case.

    Args:
        model: a network or a defense.
        eps: radius of the ball.
        version: ``"standard"``, ``"rand"`` or ``"seg"`` (see the module docstring).
        norm: ``"linf"`` or ``"l2"``.
        steps: APGD iterations.
        restarts: APGD restarts (default 1; 2 for ``"rand"``).
        n_targets: target classes of APGD-T.
        queries: Square's query budget.
        eot_samples: EOT draws per gradient (default 1; 20 for ``"rand"``).
        eval_draws: draws of a randomized defense a score is the minimum over.
        through: gradient path through a defense.
        lambda_e: adaptive equivariance term of the APGD stages.
        seed: seeds every stage.
        ignore_index: ignored label (segmentation).
        attacks: explicit ``[(name, attack), ...]`` stages instead of a version's (each
            attack maps ``(images, labels)`` to adversarial images).
        eval_mode: run the model in eval mode and restore its modes afterwards.
    """

    def __init__(self, model: nn.Module, eps: float, version: str = "standard",
                 norm: str = "linf", steps: int = 100, restarts: int | None = None,
                 n_targets: int = 9, queries: int = 5000, eot_samples: int | None = None,
                 eval_draws: int = 1, through: str = "plain", lambda_e: float = 0.0,
                 seed: int = 0, ignore_index: int = IGNORE_INDEX,
                 attacks: Sequence[tuple[str, Attack]] | None = None,
                 eval_mode: bool = True) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        if isinstance(eval_draws, bool) or not isinstance(eval_draws, int) or eval_draws < 1:
            raise ValueError(f"eval_draws must be an integer >= 1, got {eval_draws!r}")
        rand = version == "rand"
        self.core = IterativeAttack(model, eps, norm=norm, seed=seed, ignore_index=ignore_index)
        self.model, self.eps, self.version, self.eval_draws = model, eps, version, eval_draws
        self.ignore_index, self.eval_mode = ignore_index, bool(eval_mode)
        if attacks is not None:
            self.attacks = list(attacks)
            return
        common = dict(steps=steps, norm=norm, seed=seed, ignore_index=ignore_index,
                      through=through, lambda_e=lambda_e, eval_mode=eval_mode,
                      restarts=restarts if restarts is not None else (2 if rand else 1),
                      eot_samples=eot_samples if eot_samples is not None else (20 if rand
                                                                                 else 1))
        self.attacks = [("apgd-ce", APGD(model, eps, loss="ce", **common))]
        if version == "seg":
            self.attacks.append(("apgd-segpgd", APGD(model, eps, loss="segpgd", **common)))
        if rand:
            self.attacks.append(("apgd-dlr", APGD(model, eps, loss="dlr", **common)))
        else:
            self.attacks.append(("apgd-t", APGDT(model, eps, n_targets=n_targets, **common)))
            self.attacks.append(("square", Square(model, eps, queries=queries, seed=seed,
                                                  ignore_index=ignore_index, norm=norm,
                                                  eval_mode=eval_mode)))

    def __repr__(self) -> str:
        names = ", ".join(name for name, _ in self.attacks)
        return f"AutoAttackEnsemble(eps={self.eps!r}, version={self.version!r}, [{names}])"

    def score(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(score, objective)`` ``(B,)``: the minimum over ``eval_draws`` draws of the
        attacked system's per-image score (ties: the higher cross-entropy)."""
        best = None
        for r in range(self.eval_draws):
            score, obj = self.core.score(x, labels, r)
            best = (score, obj) if best is None else (
                torch.minimum(best[0], score), torch.maximum(best[1], obj))
        assert best is not None
        return best

    def __call__(self, images: Tensor, labels: Tensor) -> EnsembleResult:
        """Attack ``images (B, C, H, W)`` with ``labels``; returns the per-image worst case.
        The model runs in eval mode and is left in the modes it had."""
        x0, labels = self.core._check_images(images, labels)
        with evaluating(self.model, self.eval_mode):
            return self._run(x0, labels)

    def _run(self, x0: Tensor, labels: Tensor) -> EnsembleResult:
        """The stages on checked images ``x0 (B, C, H, W)`` and labels."""
        start = time.perf_counter()
        score, obj = self.score(x0, labels)
        best = (x0.clone(), score, obj)
        worst_stage = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        stages = [StageResult("clean", score.clone(), 0, time.perf_counter() - start)]
        for i, (name, attack) in enumerate(self.attacks, start=1):
            start = time.perf_counter()
            idx = (best[1] > 0).nonzero().squeeze(1)
            if idx.numel():
                adv = attack(x0[idx], labels[idx])
                new = (adv, *self.score(adv, labels[idx]))
                before = best[1].clone()
                best = merge_worst(best, idx, new)
                worst_stage[best[1] < before] = i
            stages.append(StageResult(name, best[1].clone(), int(idx.numel()),
                                      time.perf_counter() - start))
        out = self.core.predict(best[0])
        return EnsembleResult(best[0], labels, best[1], stages, worst_stage, out.argmax(1),
                              out.shape[1], self.ignore_index)


class EnsembleAttack:
    """:class:`AutoAttackEnsemble` as an attack of the registry (``"autoattack"``): maps
    ``(images, labels)`` to the worst-case images ``(B, C, H, W)`` and keeps the last
    :class:`EnsembleResult` in :attr:`last` (its stages feed the black-box check). Takes
    the arguments of :class:`AutoAttackEnsemble`."""

    def __init__(self, model: nn.Module, eps: float, **kwargs: Any) -> None:
        self.ensemble = AutoAttackEnsemble(model, eps, **kwargs)
        self.last: EnsembleResult | None = None

    def __repr__(self) -> str:
        return repr(self.ensemble)

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        """Worst-case adversarial images ``(B, C, H, W)`` of ``images`` with ``labels``."""
        self.last = self.ensemble(images, labels)
        return self.last.images


# the registry keeps the keyword arguments a class's signature names
EnsembleAttack.__signature__ = inspect.signature(AutoAttackEnsemble)  # type: ignore[attr-defined]
