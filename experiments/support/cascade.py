"""Per-image worst case of a model or a defense over a cascade of attacks and repeated
defended predictions (the AutoAttack way), with confidence intervals.

:func:`run_cascade` runs :class:`equivision.robust.ensemble.AutoAttackEnsemble` with
explicit stages over blocks of images: each stage attacks, from the clean images, only the
images the system still gets right (classification) or does not fully fail on (per-image
mIoU > 0), and an image's score is the minimum over every stage *and* over
``eval_draws`` seeded defended predictions. The worst case is therefore computed per image,
not as the minimum of per-attack totals. The draws that score an image are seeded apart
from the attacks' own draws (``seed`` versus the attacks' seeds), so an attack cannot
pick the iterate that fools the very noise it is scored with.

``equivision.robust.intervals`` (Wilson, bootstrap) gives 95 % intervals of an accuracy
and of a mean per-image score.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from equivision.metrics import IGNORE_INDEX, ConfusionMeter
from equivision.robust.attacks import IterativeAttack, sweep_lambda
from equivision.robust.ensemble import AutoAttackEnsemble

__all__ = ["Stage", "clean_draws", "run_cascade", "sweep_stage"]

#: ``(name, attack)``: an attack maps ``(images (B, C, H, W), labels)`` to adversarial images
Stage = tuple[str, Callable[[Tensor, Tensor], Tensor]]


def sweep_stage(defense: nn.Module, eps: float, lambdas: Sequence[float],
                **kwargs: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """The adaptive attack swept over ``lambdas`` (per-image worst case) as a stage."""
    def attack(x: Tensor, y: Tensor) -> Tensor:
        return sweep_lambda(defense, x, y, lambdas=list(lambdas), eps=eps, **kwargs).images
    return attack


def clean_draws(system: nn.Module, x: Tensor, y: Tensor, draws: int, seed: int,
                ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-image scores ``(draws, B)`` of ``system`` (a model or a defense) on clean images,
    one row per seeded defended prediction (the same draws :func:`run_cascade` scores
    with)."""
    core = IterativeAttack(system, 1.0, seed=seed, ignore_index=ignore_index)
    return torch.stack([core.score(x, y, r)[0] for r in range(draws)])


def run_cascade(system: nn.Module, stages: Sequence[Stage], x: Tensor, y: Tensor,
                eval_draws: int = 1, seed: int = 0, block: int = 64,
                ignore_index: int = IGNORE_INDEX,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Worst case per image of ``system`` over ``stages`` and ``eval_draws`` predictions.

    Args:
        system: the bare model or a defense.
        stages: attacks run in order on the images still not fooled.
        x: images ``(N, C, H, W)`` in [0, 1]; y: labels ``(N,)`` or masks ``(N, H, W)``.
        eval_draws: seeded defended predictions an image's score is the minimum over.
        seed: seed of those draws.
        block: images per ensemble call.
        log: called with one line per finished block.

    Returns:
        ``{"stages": names (clean first), "after": per-stage mean score (cumulative),
        "broken": images whose worst case each stage produced, "score": final per-image
        scores, "records": per-image rows, "seconds", and for segmentation "miou" and
        "pixel_accuracy" of the worst-case predictions and their summed "confusion"
        ``K x K`` (so that slices of the images can be joined)}``.
    """
    t0 = time.perf_counter()
    names = ["clean"] + [s[0] for s in stages]
    per_stage: list[list[float]] = [[] for _ in names]
    records: list[dict[str, Any]] = []
    meter: ConfusionMeter | None = None
    for start in range(0, x.shape[0], block):
        ens = AutoAttackEnsemble(system, 1.0, attacks=list(stages), eval_draws=eval_draws,
                                 seed=seed, ignore_index=ignore_index)
        res = ens(x[start:start + block], y[start:start + block])
        for i, st in enumerate(res.stages):
            per_stage[i] += st.score.double().tolist()
        for r in res.records():
            records.append({**r, "index": r["index"] + start})
        if res.segmentation:
            if meter is None:
                meter = ConfusionMeter(res.num_classes, ignore_index, res.predictions.device)
            meter.update(res.predictions, res.labels)
        if log is not None:
            log(f"    images {start}..{start + res.score.numel() - 1}: "
                + ", ".join(f"{s.name} {s.robust:.3f} ({s.seconds:.0f}s)" for s in res.stages))
    final = per_stage[-1]
    broken = {n: sum(1 for r in records if r["worst_stage"] == n) for n in names}
    out: dict[str, Any] = {
        "stages": names, "after": [sum(v) / len(v) for v in per_stage], "broken": broken,
        "score": final, "records": records, "seconds": time.perf_counter() - t0,
        "n": len(final)}
    if meter is not None:
        out["miou"], out["pixel_accuracy"] = meter.miou(), meter.accuracy()
        out["confusion"] = meter.confusion.cpu().tolist()
    return out
