"""Streaming statistics of one (layer, transformation) pair and the metrics they give.

For each pair we compare ``a = f(gX)`` with ``b = g·f(X)`` channel by channel over
all images and all valid spatial positions. Everything the metrics need is a sum,
so it is accumulated batch by batch in float64 (memory ``O(C^2)``, independent of
the number of images) and partial results of several processes add up:

* ``n``: number of (image, position) samples; ``sa, sb``: per-channel sums;
* ``saa, sbb``: per-channel sums of squares; ``sab``: the ``C x C`` cross-products;
* ``sl1, sse``: per-channel sums of ``|a - b|`` and ``(a - b)^2``;
* ``cos_sum, images``: per-image global cosine (defense paper Eq. 2) summed, and
  the number of images.

Each batch's cross-product is computed on centred float32 data and turned back into
raw sums in float64, which keeps the correlation accurate when means are large.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Relative variance under which a channel counts as constant (excluded, counted).
CONSTANT_TOL = 1e-10


def rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """Flatten a captured tensor to samples x channels, keeping valid positions.

    Args:
        x: ``(B, C)``, ``(B, C, h, w)`` or ``(B, C, G, h, w)`` (group axis folded into
            channels).
        mask: ``(h, w)`` boolean mask of valid positions, or ``None``.

    Returns:
        ``(B * n_valid, C')``.
    """
    if x.dim() == 2:
        return x
    if x.dim() == 5:
        b, c, g, h, w = x.shape
        x = x.reshape(b, c * g, h, w)
    b, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    if mask is not None and not bool(mask.all()):
        flat = flat[:, mask.reshape(-1)]
    return flat.reshape(-1, c)


@dataclass
class PairStats:
    """Accumulated sums for ``C`` channels; see the module docstring."""

    channels: int
    n: float = 0.0
    images: float = 0.0
    cos_sum: float = 0.0
    sa: Tensor = field(default=None)  # type: ignore[assignment]
    sb: Tensor = field(default=None)  # type: ignore[assignment]
    saa: Tensor = field(default=None)  # type: ignore[assignment]
    sbb: Tensor = field(default=None)  # type: ignore[assignment]
    sab: Tensor = field(default=None)  # type: ignore[assignment]
    sl1: Tensor = field(default=None)  # type: ignore[assignment]
    sse: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        c = self.channels
        z = torch.zeros
        self.sa, self.sb, self.saa, self.sbb, self.sl1, self.sse = (
            z(c, dtype=torch.float64) for _ in range(6))
        self.sab = z(c, c, dtype=torch.float64)

    def update(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch. ``a = f(gX)`` and ``b = g·f(X)`` have the same shape (see :func:`rows`)."""
        ra, rb = rows(a, mask).float(), rows(b, mask).float()
        m = ra.shape[0]
        if m == 0:
            return
        ma, mb = ra.mean(0), rb.mean(0)
        ca, cb = ra - ma, rb - mb
        cross = (ca.T @ cb).double().cpu()
        ma64, mb64 = ma.double().cpu(), mb.double().cpu()
        self.sab += cross + m * torch.outer(ma64, mb64)
        self.saa += (ca * ca).sum(0).double().cpu() + m * ma64 * ma64
        self.sbb += (cb * cb).sum(0).double().cpu() + m * mb64 * mb64
        self.sa += m * ma64
        self.sb += m * mb64
        diff = ra - rb
        self.sl1 += diff.abs().sum(0).double().cpu()
        self.sse += (diff * diff).sum(0).double().cpu()
        self.n += m
        # per-image global cosine over all valid C x h x w entries
        bsz = a.shape[0]
        fa, fb = a.reshape(bsz, -1).float(), b.reshape(bsz, -1).float()
        if mask is not None and a.dim() >= 4:
            keep = mask.reshape(-1).repeat(fa.shape[1] // mask.numel())
            fa, fb = fa[:, keep], fb[:, keep]
        cos = torch.nn.functional.cosine_similarity(fa, fb, dim=1, eps=1e-12)
        self.cos_sum += float(cos.double().sum())
        self.images += bsz

    # ---- reduction across processes ------------------------------------------
    def flat(self) -> Tensor:
        """All sums as one float64 vector (for ``all_reduce``)."""
        head = torch.tensor([self.n, self.images, self.cos_sum], dtype=torch.float64)
        parts = [head, self.sa, self.sb, self.saa, self.sbb, self.sl1, self.sse,
                 self.sab.reshape(-1)]
        return torch.cat(parts)

    def load_flat(self, v: Tensor) -> None:
        """Inverse of :meth:`flat`."""
        c = self.channels
        v = v.double().cpu()
        self.n, self.images, self.cos_sum = (float(t) for t in v[:3])
        o = 3
        for attr in ("sa", "sb", "saa", "sbb", "sl1", "sse"):
            setattr(self, attr, v[o : o + c].clone())
            o += c
        self.sab = v[o : o + c * c].reshape(c, c).clone()

    def merge(self, other: PairStats) -> None:
        """Add another accumulator's sums (e.g. another process's shard)."""
        self.load_flat(self.flat() + other.flat())

    # ---- metrics ------------------------------------------------------------
    def metrics(self) -> dict:
        """Layer metrics and per-channel values.

        Returns a dict with ``invariance`` and ``equivariance`` (Pearson, Eqs. 4 and 7 of
        the learned-equivariance paper, averaged over non-constant channels),
        ``invariance_cosine`` / ``equivariance_cosine`` (the same with cosine
        similarity), ``mse`` and ``l1`` (mean over valid positions, images and
        channels), ``nmse`` (mse divided by the mean square of ``g·f(X)``), ``cosine``
        (mean per-image global cosine), ``n_constant`` (channels excluded as constant)
        and ``per_channel`` lists.
        """
        n = self.n
        if n == 0:
            raise ValueError("no samples were accumulated")
        c = self.channels
        mean_a, mean_b = self.sa / n, self.sb / n
        var_a = (self.saa / n - mean_a**2).clamp_min(0)
        var_b = (self.sbb / n - mean_b**2).clamp_min(0)
        live_a = var_a > CONSTANT_TOL * (1.0 + mean_a**2)
        live_b = var_b > CONSTANT_TOL * (1.0 + mean_b**2)
        cov = self.sab / n - torch.outer(mean_a, mean_b)
        denom = torch.sqrt(torch.outer(var_a, var_b)).clamp_min(1e-300)
        corr = (cov / denom).clamp(-1.0, 1.0)
        corr[~live_a] = float("nan")
        corr[:, ~live_b] = float("nan")
        diag = torch.diagonal(corr)
        inv_ok = live_a & live_b
        eq = torch.where(live_b[None, :], corr, torch.full_like(corr, -float("inf"))).amax(1)
        eq_ok = live_a & bool(live_b.any())
        norm = torch.sqrt(torch.outer(self.saa, self.sbb)).clamp_min(1e-300)
        cosm = self.sab / norm
        nz_a, nz_b = self.saa > 0, self.sbb > 0
        cos_diag = torch.diagonal(cosm)
        cos_eq = torch.where(nz_b[None, :], cosm, torch.full_like(cosm, -float("inf"))).amax(1)
        mse = float(self.sse.sum() / (n * c))
        ms_b = float(self.sbb.sum() / (n * c))

        def avg(v: Tensor, ok: Tensor) -> float | None:
            return float(v[ok].mean()) if bool(ok.any()) else None

        def lst(v: Tensor, ok: Tensor) -> list[float | None]:
            return [float(x) if k else None for x, k in zip(v.tolist(), ok.tolist())]

        return {
            "invariance": avg(diag, inv_ok),
            "equivariance": avg(eq, eq_ok),
            "invariance_cosine": avg(cos_diag, nz_a & nz_b),
            "equivariance_cosine": avg(cos_eq, nz_a & bool(nz_b.any())),
            "mse": mse,
            "l1": float(self.sl1.sum() / (n * c)),
            "nmse": mse / ms_b if ms_b > 0 else None,
            "cosine": self.cos_sum / self.images if self.images else None,
            "n_constant": int((~inv_ok).sum()),
            "per_channel": {"invariance": lst(diag, inv_ok), "equivariance": lst(eq, eq_ok)},
        }
