"""The Square attack (Andriushchenko et al., ECCV 2020): score-based, no gradients, L-inf.

Random search over the vertices of the L-inf ball:

* start from vertical stripes ``x + eps * s``, ``s in {-1, +1}`` per channel and column;
* at iteration ``i`` draw, per image, a square window of side
  ``round(sqrt(p_i * H * W))`` (between 1 and ``min(H, W) - 1``) at a uniform position
  and add ``2 eps * (+-1)`` per channel inside it (projected to the ball and [0, 1]: the
  window's perturbation jumps to a vertex); keep the candidate when it lowers the margin
  ``z_y - max_{j != y} z_j`` (for segmentation: raises the mean over the valid pixels of
  ``min(max_{j != y} z_j - z_y, 0)``, the ``"cw"`` objective of
  :func:`~equivision.robust.attacks.attack_objective`);
* the fraction ``p_i`` follows the paper's schedule (:func:`square_p`): ``p_init`` halved
  at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10000 rescaled iterations;
* an image stops being queried once it is fooled (score 0: misclassified, or per-image
  mIoU 0).

Only forward passes of the attacked system are used (:meth:`IterativeAttack.predict`: a
defense purifies with a fresh seeded draw per query), so the model may be
non-differentiable and the attack runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .apgd import merge_worst
from .attacks import IterativeAttack, attack_objective
from .metrics import IGNORE_INDEX, per_image_score

__all__ = ["Square", "square_p"]

_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(p_init: float, iteration: int, queries: int) -> float:
    """The fraction of pixels a window covers at ``iteration`` of ``queries``: ``p_init``
    halved once per threshold of :data:`_P_HALVINGS` passed by
    ``int(iteration / queries * 10000)``."""
    it = int(iteration / queries * 10000)
    return p_init / 2 ** sum(it > t for t in _P_HALVINGS)


class Square:
    """L-inf Square attack; call ``attack(images, labels)``.

    Images ``(B, C, H, W)`` in [0, 1], labels ``(B,)`` / ``(B, H, W)``. Returns adversarial
    images of the same shape within the eps ball and [0, 1]; :attr:`queries` ``(B,)`` holds
    the model queries each image used in the last call.

    Args:
        model: any callable network or defense (only forward passes are used).
        eps: L-inf radius (> 0).
        queries: iterations (one query per active image each).
        p_init: initial fraction of pixels changed (0.8 as in AutoAttack).
        restarts: independent runs on the images not yet fooled.
        seed: seeds the random search and the defense's draws.
        ignore_index: ignored label (segmentation).
    """

    def __init__(self, model: nn.Module, eps: float, queries: int = 5000, p_init: float = 0.8,
                 restarts: int = 1, seed: int = 0, ignore_index: int = IGNORE_INDEX) -> None:
        if not (isinstance(p_init, (int, float)) and 0.0 < p_init <= 1.0):
            raise ValueError(f"Square: p_init must lie in (0, 1], got {p_init!r}")
        self.core = IterativeAttack(model, eps, steps=queries, restarts=restarts, seed=seed,
                                    ignore_index=ignore_index, loss="cw")
        self.model, self.eps, self.p_init = model, self.core.eps, float(p_init)
        self.queries_limit, self.restarts, self.seed = queries, restarts, seed
        self.ignore_index = self.core.ignore_index
        self.queries: Tensor | None = None

    def __repr__(self) -> str:
        return (f"Square(eps={self.eps!r}, queries={self.queries_limit!r}, "
                f"p_init={self.p_init!r}, restarts={self.restarts!r})")

    def score(self, x: Tensor, labels: Tensor, restart: int = 0) -> tuple[Tensor, Tensor]:
        """``(score, objective)`` ``(B,)`` of the attacked system at ``x`` (objective: the
        ``"cw"`` margin, higher = closer to fooled)."""
        return self.core.score(x, labels, restart)

    def _query(self, x: Tensor, labels: Tensor, draw: int) -> tuple[Tensor, Tensor]:
        out = self.core.predict(x, draw)
        obj = attack_objective(out, labels, "cw", ignore_index=self.ignore_index).double()
        return per_image_score(out, labels, self.ignore_index), obj

    def _window(self, shape: torch.Size, side: int, gen: torch.Generator,
                device: torch.device) -> Tensor:
        """Boolean masks ``(B, 1, H, W)`` of one ``side x side`` square per image."""
        b, _, h, w = shape
        top = torch.randint(0, h - side + 1, (b, 1, 1, 1), generator=gen, device=device)
        left = torch.randint(0, w - side + 1, (b, 1, 1, 1), generator=gen, device=device)
        rows = torch.arange(h, device=device).view(1, 1, h, 1)
        cols = torch.arange(w, device=device).view(1, 1, 1, w)
        return (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)

    def _signs(self, shape: tuple[int, ...], gen: torch.Generator, x: Tensor) -> Tensor:
        bits = torch.randint(0, 2, shape, generator=gen, device=x.device)
        return (2 * bits - 1).to(x.dtype)

    def run_once(self, x0: Tensor, labels: Tensor, restart: int,
                 gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One run; returns ``(images, score, objective, queries)``, each per image."""
        b, c, h, w = x0.shape
        eps = self.eps
        x_best = (x0 + eps * self._signs((b, c, 1, w), gen, x0)).clamp(0.0, 1.0)
        base = 1_000_003 * (restart + 1)
        score, obj = self._query(x_best, labels, base)
        queries = torch.ones(b, dtype=torch.long, device=x0.device)
        side_max = max(min(h, w) - 1, 1)
        for i in range(self.queries_limit - 1):
            active = (score > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            p = square_p(self.p_init, i, self.queries_limit)
            side = min(max(int(round(math.sqrt(p * h * w))), 1), side_max)
            xa, xb = x0[active], x_best[active]
            mask = self._window(xa.shape, side, gen, x0.device)
            step = 2 * eps * self._signs((active.numel(), c, 1, 1), gen, x0)
            cand = torch.minimum(torch.maximum(xb + mask * step, xa - eps), xa + eps)
            cand = cand.clamp(0.0, 1.0)
            new_score, new_obj = self._query(cand, labels[active], base + i + 1)
            queries[active] += 1
            better = new_obj > obj[active]
            x_best[active] = torch.where(better.view(-1, 1, 1, 1), cand, xb)
            obj[active] = torch.where(better, new_obj, obj[active])
            score[active] = torch.where(better, new_score, score[active])
        return x_best, score, obj, queries

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        """Adversarial images ``(B, C, H, W)``; no gradient is taken."""
        x0, labels = self.core._check_images(images, labels)
        out = self.core.predict(x0[:1])
        self.core._check_output(out, labels[:1])
        gen = torch.Generator(device=x0.device).manual_seed(self.seed)
        best: tuple[Tensor, Tensor, Tensor] | None = None
        used = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        for r in range(self.restarts):
            active = torch.ones_like(used, dtype=torch.bool) if best is None else best[1] > 0
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            adv, score, obj, q = self.run_once(x0[idx], labels[idx], r, gen)
            used[idx] += q
            best = merge_worst(best, idx, (adv, score, obj))
        self.queries = used
        assert best is not None
        return best[0]

    def __getattr__(self, name: str) -> Any:
        if name == "core":
            raise AttributeError(name)
        return getattr(self.core, name)
