"""Losses for SSL with soft equivariance regularization.

* :class:`PatchNTXent` — SER's patch-wise NT-Xent on token maps at layer L.
* :func:`infonce` — MoCo-v3's InfoNCE (keys gathered from all processes).
* :class:`DINOLoss` — DINO's cross-entropy with centring and teacher temperature.
* :func:`barlow_twins_loss` — Barlow Twins on a batch-normalised cross-correlation.
* :class:`AugSelfHead`, :class:`EquiModHead` — the AugSelf and EquiMod objectives
  moved to the token map at layer L (mean-pooled), for the layer-decoupling study.

Every cross-image quantity is computed over the global batch of all processes with
the gathers of :mod:`equivision.ssl.gather`; gradients flow through them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..transforms import Transform
from ..transforms.elements import ElementBatch
from .gather import all_reduce_sum, gather_no_grad, gather_with_grad, rank_and_world
from .views import geometric_params

__all__ = [
    "AugSelfHead", "DINOLoss", "EquiModHead", "PatchNTXent", "barlow_twins_loss",
    "infonce", "mlp",
]


def mlp(dim: int, hidden: int, out: int, layers: int = 2, bn: bool = False,
        last_bn: bool = False, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """``layers``-layer MLP ``dim -> hidden -> ... -> out`` (optional BatchNorm)."""
    mods: list[nn.Module] = []
    d = dim
    for _ in range(layers - 1):
        mods.append(nn.Linear(d, hidden, bias=not bn))
        if bn:
            mods.append(nn.BatchNorm1d(hidden))
        mods.append(act())
        d = hidden
    mods.append(nn.Linear(d, out, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*mods)


def _offset(n: int, device: torch.device) -> int:
    rank, world = rank_and_world()
    if world == 1:
        return 0
    sizes = gather_no_grad(torch.tensor([n], device=device))
    return int(sizes[:rank].sum())


class PatchNTXent(nn.Module):
    """SER's patch-wise NT-Xent between ``g·f(x1)`` and ``f(x2)`` on token maps.

    Each token vector goes through a 2-layer GELU MLP projector (``dim -> hidden ->
    proj_dim``).  For anchor ``(i, j)`` (image i, position j of ``z = g·tokens1``) the
    positive is ``z'_ij`` (same image and position of ``tokens2``); the negatives are
    all tokens ``z_mn`` and ``z'_mn`` of the other images ``m ≠ i`` of the global batch
    (all processes), never other positions of the same image.  Similarities are
    cosines divided by ``tau``.  Positions marked invalid (``valid``; by default those
    that ``g`` fills from outside the map; :meth:`ViewBatch.valid_masks
    <equivision.ssl.views.ViewBatch.valid_masks>` also drops each view's own padding)
    are neither anchors nor negatives.

    The returned value is the mean over all valid anchors of the global batch,
    multiplied by the number of processes over the sum of valid anchors (so that the
    average over processes equals one process with the whole batch; a
    DistributedDataParallel gradient average then matches it too).
    """

    def __init__(self, dim: int, proj_dim: int = 512, hidden: int = 1024,
                 tau: float = 0.2) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau = tau
        self.projector = mlp(dim, hidden, proj_dim)

    def forward(self, tokens1: Tensor, tokens2: Tensor, relative: Sequence[Transform],
                valid: Tensor | None = None) -> Tensor:
        """``tokens1, tokens2 (M, D, h, w)``, ``relative``: M elements, ``valid (M, h, w)``
        bool usable positions (default: those ``g`` fills from inside) -> 0-dim loss."""
        if tokens1.shape != tokens2.shape or tokens1.dim() != 4:
            raise ValueError(f"expected two token maps (M, D, h, w) of the same shape, got "
                             f"{tuple(tokens1.shape)} and {tuple(tokens2.shape)}")
        m, d, h, w = tokens1.shape
        elements = ElementBatch(relative)
        z = elements.apply_map(tokens1)
        if valid is None:
            valid = elements.valid_masks((h, w), device=tokens1.device)
        image = torch.arange(m, device=tokens1.device).repeat_interleave(h * w)
        return self.forward_flat(z.flatten(2).transpose(1, 2).reshape(m * h * w, d),
                                 tokens2.flatten(2).transpose(1, 2).reshape(m * h * w, d),
                                 image, valid.to(tokens1.device).reshape(-1), m)

    def forward_flat(self, z1: Tensor, z2: Tensor, image: Tensor, valid: Tensor,
                     n_images: int) -> Tensor:
        """The loss on flattened positions: ``z1 = (g·tokens1)`` and ``z2 = tokens2`` as
        ``(T, D)`` (the positions of all ``n_images`` local images, which may have token
        maps of different sizes), ``image (T,)`` the local image index ``0..n_images-1``
        of each position and ``valid (T,)`` bool -> 0-dim loss."""
        p1 = F.normalize(self.projector(z1), dim=-1)  # (T, E)
        p2 = F.normalize(self.projector(z2), dim=-1)
        start = _offset(n_images, z1.device)
        anchor_img = image + start
        all1, all2 = gather_with_grad(p1), gather_with_grad(p2)  # (G_T, E)
        all_valid = gather_no_grad(valid.float()) > 0.5  # (G_T,)
        key_img = gather_no_grad(anchor_img).repeat(2)
        pos = (p1 * p2).sum(-1) / self.tau
        sim = p1 @ torch.cat([all1, all2]).T / self.tau  # (T, 2 G_T)
        allowed = (key_img[None] != anchor_img[:, None]) & all_valid.repeat(2)[None]
        sim = sim.masked_fill(~allowed, float("-inf"))
        per = torch.logsumexp(torch.cat([pos[:, None], sim], 1), 1) - pos
        keep = valid
        _, world = rank_and_world()
        total = all_reduce_sum(keep.sum().to(per.dtype))
        if float(total) == 0:
            return per.sum() * 0.0
        return (per * keep).sum() * world / total


def infonce(q: Tensor, k: Tensor, tau: float = 0.2) -> Tensor:
    """MoCo-v3 InfoNCE: queries ``q (B, E)`` against keys ``k (B, E)`` of the global
    batch (gathered without gradient: keys come from the momentum encoder); the
    positive of ``q_i`` is ``k_i``.  Returns the mean cross-entropy times ``2·tau``
    (MoCo-v3's scaling)."""
    q = F.normalize(q, dim=1)
    keys = gather_no_grad(F.normalize(k, dim=1))
    logits = q @ keys.T / tau
    labels = _offset(q.shape[0], q.device) + torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2 * tau)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051) -> Tensor:
    """Barlow Twins: ``sum_i (1 - C_ii)^2 + lambd · sum_{i≠j} C_ij^2`` with ``C`` the
    cross-correlation of ``z1, z2 (B, E)`` standardised over the global batch
    (gathered with gradients; every process gets the same value)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"expected two (B, E) embeddings, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    a, b = gather_with_grad(z1), gather_with_grad(z2)
    if a.shape[0] < 2:
        raise ValueError("Barlow Twins needs at least 2 images in the global batch")
    a = (a - a.mean(0)) / (a.std(0, unbiased=False) + 1e-5)
    b = (b - b.mean(0)) / (b.std(0, unbiased=False) + 1e-5)
    c = a.T @ b / a.shape[0]
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


class DINOLoss(nn.Module):
    """DINO's loss: cross-entropy between the centred, sharpened teacher softmax and
    the student log-softmax over pairs of different views.

    The teacher temperature rises linearly from ``warmup_teacher_temp`` to
    ``teacher_temp`` over the first ``warmup_frac`` of training (:meth:`set_progress`);
    the centre is an EMA (``center_momentum``) of the global-batch teacher mean,
    updated in every training forward pass.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_frac: float = 0.3,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_frac = warmup_teacher_temp, warmup_frac
        self.center_momentum = center_momentum
        self.current_teacher_temp = warmup_teacher_temp
        self.register_buffer("center", torch.zeros(1, out_dim))

    def set_progress(self, step: int, total_steps: int) -> None:
        """Set the teacher temperature for training step ``step`` of ``total_steps``."""
        warm = self.warmup_frac * total_steps
        t = 1.0 if warm <= 0 else min(step / warm, 1.0)
        self.current_teacher_temp = self.warmup_teacher_temp + t * (
            self.teacher_temp - self.warmup_teacher_temp)

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
        """``student``/``teacher``: per view ``(B, K)`` logits -> 0-dim loss."""
        t_probs = [F.softmax((t.detach() - self.center) / self.current_teacher_temp, dim=-1)
                   for t in teacher]
        total, pairs = 0.0, 0
        for i, tp in enumerate(t_probs):
            for j, s in enumerate(student):
                if i == j:
                    continue
                total = total + (-tp * F.log_softmax(s / self.student_temp, dim=-1)).sum(-1).mean()
                pairs += 1
        if self.training:
            self.update_center(torch.cat([t.detach() for t in teacher]))
        return total / pairs

    @torch.no_grad()
    def collapse_stats(self, teacher: Tensor) -> dict[str, float]:
        """How far teacher logits ``(B, K)`` are from DINO's two collapses, with the
        current centre and teacher temperature (local batch; nothing is updated).

        * ``entropy_sample``: mean per-image entropy of the teacher distribution (nats);
          near ``max_entropy = ln K``: uniform collapse (every output flat).
        * ``entropy_mean``: entropy of the batch-mean distribution; near 0: one
          prototype dominates for every image (dominant-dimension collapse).
          A healthy teacher has ``entropy_sample`` well below ``entropy_mean``, and
          ``entropy_mean`` close to ``max_entropy``.
        * ``logit_std``: per-image std over the K logits before centring and temperature
          (they are cosines, so at most 1); ``image_std``: std over the images of each
          logit, averaged over K (what differs between images; divided by the
          temperature it bounds how sharp the centred teacher can be).
        """
        if teacher.dim() != 2 or teacher.shape[1] != self.center.shape[1]:
            raise ValueError(f"expected teacher logits (B, {self.center.shape[1]}), got "
                             f"{tuple(teacher.shape)}")
        p = F.softmax((teacher - self.center) / self.current_teacher_temp, dim=-1)
        mean = p.mean(0)
        return {"entropy_sample": float(torch.special.entr(p).sum(-1).mean()),
                "entropy_mean": float(torch.special.entr(mean).sum()),
                "max_entropy": math.log(teacher.shape[1]),
                "logit_std": float(teacher.std(-1).mean()),
                "image_std": float(teacher.std(0).mean()) if teacher.shape[0] > 1 else 0.0}

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """EMA of the global-batch mean of teacher logits ``(B, K)``."""
        s = all_reduce_sum(teacher.sum(0, keepdim=True))
        n = all_reduce_sum(torch.tensor(float(teacher.shape[0]), device=teacher.device))
        self.center.mul_(self.center_momentum).add_(s / n * (1 - self.center_momentum))


def _param_vector(t: Transform, device: torch.device) -> Tensor:
    k, flip, sx, sy = geometric_params(t)
    onehot = [1.0 if i == k else 0.0 for i in range(4)]
    return torch.tensor(onehot + [float(flip), math.log(sx), math.log(sy)], device=device)


class AugSelfHead(nn.Module):
    """AugSelf at layer L: from the mean-pooled token maps of both views, predict the
    difference of their geometric parameters: relative rotation ``(k2 - k1) mod 4``
    (4-way cross-entropy), whether exactly one view is flipped (binary
    cross-entropy) and ``log(s2 / s1)`` per axis (squared error)."""

    def __init__(self, dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.net = mlp(2 * dim, hidden, 4 + 1 + 2, layers=3)

    def forward(self, tokens1: Tensor, tokens2: Tensor, g1: Sequence[Transform],
                g2: Sequence[Transform]) -> Tensor:
        """``tokens (M, D, h, w)``, elements of both views -> 0-dim loss (local mean)."""
        out = self.net(torch.cat([tokens1.mean((2, 3)), tokens2.mean((2, 3))], 1))
        p1 = [geometric_params(t) for t in g1]
        p2 = [geometric_params(t) for t in g2]
        dev = tokens1.device
        rot = torch.tensor([(b[0] - a[0]) % 4 for a, b in zip(p1, p2)], device=dev)
        flip = torch.tensor([float(a[1] != b[1]) for a, b in zip(p1, p2)], device=dev)
        logs = torch.tensor([[math.log(b[2] / a[2]), math.log(b[3] / a[3])]
                             for a, b in zip(p1, p2)], device=dev).reshape(-1, 2)
        return (F.cross_entropy(out[:, :4], rot)
                + F.binary_cross_entropy_with_logits(out[:, 4], flip)
                + F.mse_loss(out[:, 5:], logs))


class EquiModHead(nn.Module):
    """EquiMod at layer L: project the mean-pooled token maps, predict the second
    view's embedding from the first and the relative element's parameters
    (rotation one-hot, flip, log-scales), and contrast the prediction with the second
    embedding (NT-Xent with the other images of the global batch as negatives)."""

    def __init__(self, dim: int, proj_dim: int = 128, hidden: int = 512,
                 tau: float = 0.2) -> None:
        super().__init__()
        self.tau = tau
        self.projector = mlp(dim, hidden, proj_dim)
        self.param_embed = nn.Linear(7, proj_dim)
        self.predictor = mlp(2 * proj_dim, hidden, proj_dim)

    def forward(self, tokens1: Tensor, tokens2: Tensor,
                relative: Sequence[Transform]) -> Tensor:
        """``tokens (M, D, h, w)``, M relative elements -> 0-dim loss (local mean)."""
        z1 = self.projector(tokens1.mean((2, 3)))
        z2 = self.projector(tokens2.mean((2, 3)))
        params = torch.stack([_param_vector(t, tokens1.device) for t in relative])
        pred = self.predictor(torch.cat([z1, self.param_embed(params)], 1))
        pred, z2 = F.normalize(pred, dim=1), F.normalize(z2, dim=1)
        keys = gather_with_grad(z2)
        logits = pred @ keys.T / self.tau
        labels = _offset(pred.shape[0], pred.device) + torch.arange(pred.shape[0],
                                                                    device=pred.device)
        return F.cross_entropy(logits, labels)
