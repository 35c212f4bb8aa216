"""The Square attack (Andriushchenko et al., ECCV 2020): score-based, no gradients, L-inf
and L2.

Random search with square-shaped updates:

* L-inf: start from vertical stripes ``x + eps * s``, ``s in {-1, +1}`` per channel and
  column; at iteration ``i`` draw, per image, a square window of side
  ``round(sqrt(p_i * H * W))`` (between 1 and ``min(H, W) - 1``) at a uniform position
  and add ``2 eps * (+-1)`` per channel inside it (projected to the ball and [0, 1]: the
  window's perturbation jumps to a vertex);
* L2: start from a grid of ``+-`` two-bump patterns (:func:`square_l2_update`, each
  transposed at random) scaled to norm ``eps``;
  at each iteration draw two windows of odd side ``>= 3``, move the perturbation's mass of
  both into the first one as ``+-`` the two-bump update of :func:`square_l2_update` plus
  the first window's old perturbation (rescaled so that the total norm stays ``eps``),
  and zero the second;
* keep a candidate when it lowers the margin ``z_y - max_{j != y} z_j`` (for
  segmentation: raises the mean over the valid pixels of ``min(max_{j != y} z_j - z_y, 0)``,
  the ``"cw"`` objective of :func:`~equivision.robust.attacks.attack_objective`);
* the fraction ``p_i`` follows the paper's schedule (:func:`square_p`): ``p_init`` halved
  at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10000 rescaled iterations;
* an image stops being queried once it is fooled (score 0: misclassified, or per-image
  mIoU 0); images the model already gets wrong are not attacked.

Only forward passes of the attacked system are used (:meth:`IterativeAttack.predict`: a
defense purifies with a fresh seeded draw per query), so the model may be
non-differentiable and the attack runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..metrics import IGNORE_INDEX, per_image_score
from .apgd import evaluating, merge_worst
from .attacks import IterativeAttack, _flat_norm, attack_objective

__all__ = ["Square", "square_l2_update", "square_p", "square_pattern"]

_TINY = 1e-12
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(p_init: float, iteration: int, queries: int) -> float:
    """The fraction of pixels a window covers at ``iteration`` of ``queries``: ``p_init``
    halved once per threshold of :data:`_P_HALVINGS` passed by
    ``int(iteration / queries * 10000)``."""
    it = int(iteration / queries * 10000)
    return p_init / 2 ** sum(it > t for t in _P_HALVINGS)


def square_pattern(rows: int, cols: int) -> Tensor:
    """A ``(rows, cols)`` bump of unit L2 norm: at Chebyshev distance ``d`` from the centre
    ``(rows // 2, cols // 2)`` it is proportional to ``sum_{k=d}^{M} 1 / (k + 1)^2`` with
    ``M = max(rows // 2, cols // 2)`` (nested squares of weights ``1 / (k + 1)^2``)."""
    r = (torch.arange(rows) - rows // 2).abs().view(-1, 1)
    c = (torch.arange(cols) - cols // 2).abs().view(1, -1)
    m = max(rows // 2, cols // 2)
    weights = 1.0 / torch.arange(1, m + 2, dtype=torch.float64).square()
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} weights[k]
    out = tail[torch.maximum(r, c)]
    return (out / out.norm()).float()


def square_l2_update(side: int, flip: bool = False) -> Tensor:
    """The L2 attack's ``(side, side)`` update of unit L2 norm: a positive bump on the top
    half and a negative one on the bottom half (transposed when ``flip``)."""
    out = torch.cat([square_pattern(side // 2, side), -square_pattern(side - side // 2, side)])
    out = out / out.norm()
    return out.T.contiguous() if flip else out


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
        norm: ``"linf"`` or ``"l2"``.
        eval_mode: query the model in eval mode, restoring its modes afterwards.
    """

    def __init__(self, model: nn.Module, eps: float, queries: int = 5000, p_init: float = 0.8,
                 restarts: int = 1, seed: int = 0, ignore_index: int = IGNORE_INDEX,
                 norm: str = "linf", eval_mode: bool = True) -> None:
        if not (isinstance(p_init, (int, float)) and 0.0 < p_init <= 1.0):
            raise ValueError(f"Square: p_init must lie in (0, 1], got {p_init!r}")
        self.core = IterativeAttack(model, eps, steps=queries, restarts=restarts, seed=seed,
                                    ignore_index=ignore_index, loss="cw", norm=norm)
        self.norm, self.eval_mode = norm, bool(eval_mode)
        self.model, self.eps, self.p_init = model, self.core.eps, float(p_init)
        self.queries_limit, self.restarts, self.seed = queries, restarts, seed
        self.ignore_index = self.core.ignore_index
        self.queries: Tensor | None = None

    def __repr__(self) -> str:
        return (f"Square(eps={self.eps!r}, norm={self.norm!r}, queries={self.queries_limit!r}, "
                f"p_init={self.p_init!r}, restarts={self.restarts!r})")

    def score(self, x: Tensor, labels: Tensor, restart: int = 0) -> tuple[Tensor, Tensor]:
        """``(score, objective)`` ``(B,)`` of the attacked system at ``x`` (objective: the
        ``"cw"`` margin, higher = closer to fooled)."""
        return self.core.score(x, labels, restart)

    def _query(self, x: Tensor, labels: Tensor, draw: int) -> tuple[Tensor, Tensor]:
        out = self.core.predict(x, draw)
        obj = attack_objective(out, labels, "cw", ignore_index=self.ignore_index).double()
        return per_image_score(out, labels, self.ignore_index), obj

    def _window(self, shape: torch.Size, side: int,
                gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """One ``side x side`` square per image at a uniform position: the mask
        ``(B, 1, H, W)`` and the row ``(B, 1, H, 1)`` and column ``(B, 1, 1, W)`` offsets of
        every pixel from the square's corner."""
        b, _, h, w = shape
        dev = gen.device
        top = torch.randint(0, h - side + 1, (b, 1, 1, 1), generator=gen, device=dev)
        left = torch.randint(0, w - side + 1, (b, 1, 1, 1), generator=gen, device=dev)
        rows = torch.arange(h, device=dev).view(1, 1, h, 1) - top
        cols = torch.arange(w, device=dev).view(1, 1, 1, w) - left
        mask = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
        return mask, rows, cols

    def _signs(self, shape: tuple[int, ...], gen: torch.Generator, x: Tensor) -> Tensor:
        bits = torch.randint(0, 2, shape, generator=gen, device=gen.device)
        return (2 * bits - 1).to(x.device, x.dtype)

    def _side(self, i: int, h: int, w: int) -> int:
        """The window side at iteration ``i``."""
        side = int(round(math.sqrt(square_p(self.p_init, i, self.queries_limit) * h * w)))
        if self.norm == "linf":
            return min(max(side, 1), max(min(h, w) - 1, 1))
        side = max(side, 3)
        return min(side + 1 - side % 2, min(h, w))

    def _init(self, x0: Tensor, gen: torch.Generator) -> Tensor:
        """The start ``(B, C, H, W)``: vertical stripes (L-inf) or a grid of ``+-``
        two-bump patterns scaled to norm ``eps`` (L2)."""
        b, c, h, w = x0.shape
        if self.norm == "linf":
            return (x0 + self.eps * self._signs((b, c, 1, w), gen, x0)).clamp(0.0, 1.0)
        side = max(h // 5, 1)
        start = (h - 5 * side) // 2
        patterns = torch.stack([square_l2_update(side, flip) for flip in (False, True)]).to(x0)

        def blocks(n: int) -> tuple[Tensor, Tensor]:
            i = torch.arange(n, device=x0.device) - start
            inside = (i >= 0) & (i < (n // side) * side)
            return torch.where(inside, i // side, -1), i.clamp_min(0) % side

        (bi, oi), (bj, oj) = blocks(h), blocks(w)
        bi_, bj_ = bi.clamp_min(0)[:, None], bj.clamp_min(0)[None, :]
        flips = torch.randint(0, 2, (h // side, w // side), generator=gen, device=gen.device)
        tiles = patterns[flips.to(x0.device)[bi_, bj_], oi[:, None], oj[None, :]]  # (H, W)
        signs = self._signs((b, c, h // side, w // side), gen, x0)
        delta = signs[:, :, bi_, bj_] * tiles * ((bi >= 0)[:, None] & (bj >= 0)[None, :])
        return (x0 + self.eps * delta / _flat_norm(delta, 2).clamp_min(_TINY)).clamp(0.0, 1.0)

    def _candidate(self, xa: Tensor, xb: Tensor, i: int, gen: torch.Generator) -> Tensor:
        """A new point for images ``xa`` whose best point is ``xb`` (both ``(n, C, H, W)``)."""
        n, c, h, w = xa.shape
        side = self._side(i, h, w)
        eps = self.eps
        if self.norm == "linf":
            mask = self._window(xa.shape, side, gen)[0].to(xa.device)
            step = 2 * eps * self._signs((n, c, 1, 1), gen, xa)
            cand = torch.minimum(torch.maximum(xb + mask * step, xa - eps), xa + eps)
            return cand.clamp(0.0, 1.0)
        delta = xb - xa
        m1, rows, cols = (t.to(xa.device) for t in self._window(xa.shape, side, gen))
        m2 = self._window(xa.shape, side, gen)[0].to(xa.device)
        flip = bool(torch.randint(0, 2, (1,), generator=gen, device=gen.device))
        update = square_l2_update(side, flip).to(xa)
        placed = update[rows.clamp(0, side - 1), cols.clamp(0, side - 1)] * m1
        norm1 = (delta.square() * m1).sum((2, 3), keepdim=True).sqrt()
        new = placed * self._signs((n, c, 1, 1), gen, xa) + delta * m1 / (norm1 + _TINY)
        budget = ((eps ** 2 - _flat_norm(delta, 2).square()).clamp_min(0) / c
                  + _flat_norm(delta * (m1 | m2), 2).square()).sqrt()
        new = new / (new.square().sum((2, 3), keepdim=True).sqrt() + _TINY) * budget
        delta = torch.where(m1, new, delta * ~m2)
        return (xa + eps * delta / _flat_norm(delta, 2).clamp_min(_TINY)).clamp(0.0, 1.0)

    def run_once(self, x0: Tensor, labels: Tensor, restart: int,
                 gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One run; returns ``(images, score, objective, queries)``, each per image."""
        x_best = self._init(x0, gen)
        base = 1_000_003 * (restart + 1)
        score, obj = self._query(x_best, labels, base)
        queries = torch.ones(x0.shape[0], dtype=torch.long, device=x0.device)
        for i in range(self.queries_limit - 1):
            active = (score > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            xa, xb = x0[active], x_best[active]
            cand = self._candidate(xa, xb, i, gen)
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
        gen = torch.Generator(device=x0.device).manual_seed(self.seed)
        with evaluating(self.model, self.eval_mode):
            best = (x0.clone(), *self.score(x0, labels))  # images already wrong stay clean
            used = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
            for r in range(self.restarts):
                idx = (best[1] > 0).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                adv, score, obj, q = self.run_once(x0[idx], labels[idx], r, gen)
                used[idx] += q
                best = merge_worst(best, idx, (adv, score, obj))
        self.queries = used
        return best[0]

    def __getattr__(self, name: str) -> Any:
        if name == "core":
            raise AttributeError(name)
        return getattr(self.core, name)
