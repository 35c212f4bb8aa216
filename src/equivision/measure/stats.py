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
#: Elements per chunk of images in :meth:`PairStats.update` (about 2 MB of float32).
CHUNK_ELEMENTS = 1 << 19


def per_image(x: Tensor, mask: Tensor | None) -> Tensor:
    """Lay a captured tensor out as images x channels x valid positions.

    Args:
        x: ``(B, C)``, ``(B, C, h, w)`` or ``(B, C, G, h, w)`` (group axis folded into
            channels).
        mask: ``(h, w)`` boolean mask of valid positions, or ``None``.

    Returns:
        ``(B, C', n_valid)`` float32 (a view when nothing is dropped).
    """
    if x.dim() == 2:
        return x.float()[..., None]
    if x.dim() == 5:
        b, c, g, h, w = x.shape
        x = x.reshape(b, c * g, h, w)
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w).float()
    if mask is not None and not bool(mask.all()):
        flat = flat[:, :, mask.reshape(-1)]
    return flat


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
        # the per-channel sums are rows of one buffer, so that a batch adds with one op
        self._vec = torch.zeros(6, c, dtype=torch.float64)
        self.sa, self.sb, self.saa, self.sbb, self.sl1, self.sse = self._vec.unbind(0)
        self.sab = torch.zeros(c, c, dtype=torch.float64)

    def update(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> bool:
        """Add a batch. ``a = f(gX)`` and ``b = g·f(X)`` have the same shape: ``(B, C)``,
        ``(B, C, h, w)`` or ``(B, C, G, h, w)``; ``mask`` ``(h, w)`` marks valid positions.

        Statistics are first taken per image on data centred per image and channel
        (float32, on the input's device), then turned into raw sums in float64: this
        keeps the correlation accurate when means are large compared to deviations.

        Returns:
            False if the batch contained NaN or Inf (nothing is added then).
        """
        ra, rb = per_image(a, mask), per_image(b, mask)
        bsz, c, m = ra.shape
        if m == 0:
            return True
        # chunks of images small enough to stay in cache through the passes below
        step = max(1, CHUNK_ELEMENTS // max(1, c * m))
        return all(self._update(ra[i : i + step], rb[i : i + step]) for i in range(0, bsz, step))

    def _update(self, ra: Tensor, rb: Tensor) -> bool:
        """:meth:`update` on ``(B, C, N)`` float32 tensors: a few passes over the data,
        then every per-channel sum from one stacked float64 tensor."""
        bsz, _, m = ra.shape
        sa_i, sb_i = ra.sum(-1), rb.sum(-1)  # (B, C)
        if not bool(torch.isfinite(torch.stack((sa_i, sb_i))).all()):
            return False
        ma, mb = sa_i / m, sb_i / m
        ca, cb = ra - ma[..., None], rb - mb[..., None]
        gram = torch.bmm(ca, cb.transpose(1, 2))  # (B, C, C) centred cross-products
        diff = ra - rb
        # (6, B, C): centred squares, squared and absolute differences, centred sums
        per = torch.stack((
            torch.linalg.vector_norm(ca, dim=-1).square(),
            torch.linalg.vector_norm(cb, dim=-1).square(),
            torch.linalg.vector_norm(diff, dim=-1).square(),
            torch.linalg.vector_norm(diff, ord=1, dim=-1),
            ca.sum(-1), cb.sum(-1)))
        caa, cbb = per[0], per[1]
        # per-image global cosine over the valid C x h x w entries
        dot = torch.diagonal(gram, dim1=1, dim2=2).sum(-1) + m * (ma * mb).sum(-1)
        na = caa.sum(-1) + m * (ma * ma).sum(-1)
        nb = cbb.sum(-1) + m * (mb * mb).sum(-1)
        cos = dot / torch.sqrt(na * nb).clamp_min(1e-24)
        # raw sums from centred ones: sum(ab) = sum(ca cb) + ma sum(cb) + mb sum(ca) + m ma mb,
        # keeping sum(ca) (not exactly 0, since ma is rounded) for full accuracy
        p64 = per.double()
        ma64, mb64 = ma.double(), mb.double()
        sca, scb = p64[4], p64[5]
        # sum over images of ma (x) (scb + m mb) + sca (x) mb, as one (C, 2B) @ (2B, C)
        left = torch.cat((ma64, sca)).T
        right = torch.cat((scb + m * mb64, mb64))
        self.sab += (gram.double().sum(0) + left @ right).cpu()
        self._vec += torch.stack((
            sca + m * ma64, scb + m * mb64,
            p64[0] + 2 * ma64 * sca + m * ma64 * ma64,
            p64[1] + 2 * mb64 * scb + m * mb64 * mb64,
            p64[3], p64[2])).sum(1).cpu()
        self.n += bsz * m
        self.cos_sum += float(cos.double().sum())
        self.images += bsz
        return True

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
        self._vec.copy_(v[3 : 3 + 6 * c].reshape(6, c))  # sa, sb, saa, sbb, sl1, sse
        self.sab = v[3 + 6 * c : 3 + 6 * c + c * c].reshape(c, c).clone()

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
        channels), ``nmse`` (mse divided by the mean square of ``g·f(X)``),
        ``activation`` (mean over channels of the absolute channel mean of ``g·f(X)``,
        the magnitude the learned-equivariance paper's figure 2 compares), ``cosine``
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
            "activation": float(mean_b.abs().mean()),
            "n_constant": int((~inv_ok).sum()),
            "per_channel": {"invariance": lst(diag, inv_ok), "equivariance": lst(eq, eq_ok)},
        }
