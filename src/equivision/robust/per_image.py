"""Per-image results of a robustness evaluation, their worst case and their intervals.

:class:`PerImageResults` holds, for every row (clean, each attack) and every key
(``undefended``, ``defended``, ``defended_single``), the per-image score ``(N,)`` (1/0
correct, or the per-image mIoU of a segmenter) and, for segmenters, the per-image confusion
matrices ``(N, K, K)``; and, when scored, the per-image equivariance score of the row's
clean, attacked and restored images (:data:`EQ_KINDS`). All states are tensors indexed by
the global image index, so that processes fill their own images and a ``SUM`` all-reduce
gives everyone the whole set.

From them it computes

* the row metrics (:meth:`PerImageResults.metrics`): ``accuracy``, or ``miou``,
  ``pixel_accuracy`` and ``mean_image_miou``, each with a 95% confidence interval
  (:meth:`PerImageResults.intervals`: Wilson for an accuracy over images, the bootstrap
  over images for the segmentation figures);
* the **per-image worst case over the attacks** (:meth:`PerImageResults.worst_rows`): for
  each image and key, the attack row with the lowest score (its confusion for segmenters);
  the defended keys are already the worst over the defense's repeats;
* the mean equivariance scores of a row with bootstrap intervals, and the paired
  per-image differences attacked - clean and restored - attacked
  (:meth:`PerImageResults.equivariance`, paper Table 4);
* the records of :meth:`PerImageResults.records` (one per image and row) for JSON/CSV.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..metrics import IGNORE_INDEX, confusion_matrix, miou_from_confusion
from .intervals import bootstrap_interval, wilson_interval

__all__ = ["EQ_DIFFS", "EQ_KINDS", "KEYS", "WORST_CASE", "PerImageResults"]

#: the prediction kinds of every row
KEYS = ("undefended", "defended", "defended_single")
#: the name of the per-image worst case over the attack rows
WORST_CASE = "worst-case"
#: the images whose equivariance score a row holds
EQ_KINDS = ("clean", "attacked", "restored")
#: the paired per-image differences of equivariance scores: (name, minuend, subtrahend)
EQ_DIFFS = (("attacked - clean", "attacked", "clean"),
            ("restored - attacked", "restored", "attacked"))


class PerImageResults:
    """Per-image scores (and confusions) of ``rows`` x :data:`KEYS` over ``n`` images.

    Args:
        rows: row names (``"clean"`` first, then the attacks).
        n: number of images.
        num_classes: ``K``.
        segmentation: keep per-image confusion matrices ``(N, K, K)``.
        device: where the states live.
        ignore_index: ignored label of segmentation masks.
    """

    def __init__(self, rows: Sequence[str], n: int, num_classes: int, segmentation: bool,
                 device: torch.device, ignore_index: int = IGNORE_INDEX) -> None:
        self.rows, self.n, self.k = list(rows), n, num_classes
        self.segmentation, self.ignore_index = segmentation, ignore_index
        shape = (len(self.rows), len(KEYS), n)
        self.scores = torch.zeros(shape, dtype=torch.float64, device=device)
        self.filled = torch.zeros(shape, dtype=torch.float64, device=device)
        self.confusion = torch.zeros(shape + (num_classes, num_classes), dtype=torch.int64,
                                     device=device) if segmentation else None
        eq_shape = (len(self.rows), len(EQ_KINDS), n)
        self.eq_scores = torch.zeros(eq_shape, dtype=torch.float64, device=device)
        self.eq_filled = torch.zeros(eq_shape, dtype=torch.float64, device=device)

    def tensors(self) -> list[Tensor]:
        """The states to sum across processes."""
        out = [self.scores, self.filled, self.eq_scores, self.eq_filled]
        return out + ([self.confusion] if self.confusion is not None else [])

    def record(self, row: str, key: str, start: int, score: Tensor, pred: Tensor,
               labels: Tensor) -> None:
        """Store images ``start..start+B-1``: scores ``(B,)`` and, for segmenters, the
        confusions of class maps ``pred`` against ``labels`` ``(B, H, W)``."""
        r, j = self.rows.index(row), KEYS.index(key)
        stop = start + score.shape[0]
        self.scores[r, j, start:stop] = score.double()
        self.filled[r, j, start:stop] = 1.0
        if self.confusion is not None:
            for i in range(score.shape[0]):
                self.confusion[r, j, start + i] = confusion_matrix(
                    pred[i], labels[i], self.k, self.ignore_index)

    def record_equivariance(self, row: str, kind: str, start: int, score: Tensor) -> None:
        """Store the equivariance scores ``(B,)`` of images ``start..start+B-1`` of
        ``row``, ``kind`` one of :data:`EQ_KINDS`."""
        r, j = self.rows.index(row), EQ_KINDS.index(kind)
        stop = start + score.shape[0]
        self.eq_scores[r, j, start:stop] = score.double()
        self.eq_filled[r, j, start:stop] = 1.0

    def has(self, key: str) -> bool:
        """Whether ``key`` was recorded (the defended keys need a defense)."""
        return bool(self.filled[:, KEYS.index(key)].any())

    # ------------------------------------------------------------------ worst case

    def worst_rows(self, key: str) -> Tensor:
        """Per image ``(N,)`` the index into :attr:`rows` of the attack row with the lowest
        ``key`` score (the first on ties); clean (0) when there are no attack rows."""
        j = KEYS.index(key)
        if len(self.rows) < 2:
            return torch.zeros(self.n, dtype=torch.long, device=self.scores.device)
        return self.scores[1:, j].argmin(0) + 1

    def _select(self, key: str, worst: bool, row: str | None) -> tuple[Tensor, Tensor | None]:
        """Scores ``(N,)`` and confusions ``(N, K, K)`` of one row, or of the worst case."""
        j = KEYS.index(key)
        if not worst:
            r = self.rows.index(row) if row is not None else 0
            conf = self.confusion[r, j] if self.confusion is not None else None
            return self.scores[r, j], conf
        pick = self.worst_rows(key)
        img = torch.arange(self.n, device=pick.device)
        conf = self.confusion[pick, j, img] if self.confusion is not None else None
        return self.scores[pick, j, img], conf

    # ------------------------------------------------------------------ metrics

    def metrics(self, row: str, key: str) -> dict[str, float]:
        """The row's metrics for ``key`` (``row`` may be :data:`WORST_CASE`)."""
        scores, conf = self._select(key, row == WORST_CASE, None if row == WORST_CASE else row)
        n = scores.shape[0]
        if conf is None:
            return {"accuracy": float(scores.sum()) / n if n else float("nan")}
        total = conf.sum(0)
        valid = int(total.sum())
        return {"miou": miou_from_confusion(total),
                "pixel_accuracy": float(total.diagonal().sum()) / valid if valid
                else float("nan"),
                "mean_image_miou": float(scores.mean()) if n else float("nan")}

    def intervals(self, row: str, key: str, seed: int = 0) -> dict[str, list[float]]:
        """95% confidence intervals ``{metric: [low, high]}`` of :meth:`metrics`."""
        scores, conf = self._select(key, row == WORST_CASE, None if row == WORST_CASE else row)
        n = scores.shape[0]
        if conf is None:
            return {"accuracy": list(wilson_interval(float(scores.sum()), n))}
        flat = conf.flatten(1).double().cpu()
        s = scores.double().cpu()

        def miou(w: Tensor) -> Tensor:
            return torch.tensor([miou_from_confusion(c.view(self.k, self.k))
                                 for c in w @ flat])

        def pixel(w: Tensor) -> Tensor:
            c = (w @ flat).view(-1, self.k, self.k)
            return c.diagonal(dim1=1, dim2=2).sum(1) / c.sum((1, 2))

        return {"miou": list(bootstrap_interval(n, miou, seed=seed)),
                "pixel_accuracy": list(bootstrap_interval(n, pixel, seed=seed)),
                "mean_image_miou": list(bootstrap_interval(n, lambda w: w @ s / n,
                                                           seed=seed))}

    def equivariance(self, row: str, seed: int = 0
                     ) -> tuple[dict[str, float | None], dict[str, list[float]]]:
        """Mean equivariance scores of ``row`` and their 95% intervals.

        Returns ``(means, intervals)``: ``means`` maps each of :data:`EQ_KINDS` and each
        paired difference of :data:`EQ_DIFFS` (over the images scored both ways) to its
        mean, None where nothing was scored; ``intervals`` maps the same names to the
        percentile bootstrap interval over images ``[low, high]`` (the differences are
        resampled per image, so the interval is that of the paired change)."""
        r = self.rows.index(row)
        sets = {k: (self.eq_scores[r, j], self.eq_filled[r, j] > 0)
                for j, k in enumerate(EQ_KINDS)}
        for name, a, b in EQ_DIFFS:
            sets[name] = (sets[a][0] - sets[b][0], sets[a][1] & sets[b][1])
        means: dict[str, float | None] = {}
        intervals: dict[str, list[float]] = {}
        for name, (values, mask) in sets.items():
            v = values[mask].double().cpu()
            n = v.numel()
            means[name] = float(v.mean()) if n else None
            if n:
                intervals[name] = list(bootstrap_interval(n, lambda w, v=v: w @ v / v.numel(),
                                                          seed=seed))
        return means, intervals

    # ------------------------------------------------------------------ records

    def records(self) -> list[dict[str, Any]]:
        """One dict per image and row (the rows, then :data:`WORST_CASE` when there are
        attack rows): ``index``, ``row``, the score of each recorded key, the row's
        equivariance scores where scored (``equivariance_<kind>``) and, for the worst case,
        the row each key's worst case came from (``<key>_from``)."""
        keys = [k for k in KEYS if self.has(k)]
        scores = self.scores.cpu().tolist()
        eq = self.eq_scores.cpu().tolist()
        eq_filled = self.eq_filled.cpu().tolist()
        out: list[dict[str, Any]] = []
        worst = {k: self.worst_rows(k).cpu().tolist() for k in keys} \
            if len(self.rows) > 1 else {}
        for i in range(self.n):
            for r, name in enumerate(self.rows):
                out.append({"index": i, "row": name,
                            **{k: scores[r][KEYS.index(k)][i] for k in keys},
                            **{f"equivariance_{k}": eq[r][j][i]
                               for j, k in enumerate(EQ_KINDS) if eq_filled[r][j][i]}})
            if worst:
                rec: dict[str, Any] = {"index": i, "row": WORST_CASE}
                for k in keys:
                    rec[k] = scores[worst[k][i]][KEYS.index(k)][i]
                    rec[f"{k}_from"] = self.rows[worst[k][i]]
                out.append(rec)
        return out
