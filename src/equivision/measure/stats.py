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

Each chunk of a batch is summed in float32 on data shifted by a per-channel reference
(the first batch's mean) and turned back into raw sums in float64, which keeps the
correlation accurate when means are large; one ``bmm`` gives the cross-products and
the per-channel sums together (see :func:`workspace`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
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
        ``(B, C', h, w)`` when every position is valid (a view of ``x``, strides kept:
        the reductions read it as it is), else ``(B, C', n_valid)``; ``(B, C, 1)`` for
        vectors. The dtype is kept.
    """
    if x.dim() == 2:
        return x[..., None]
    if x.dim() == 5:
        b, c, g, h, w = x.shape
        x = x.reshape(b, c * g, h, w)
    if mask is not None and not bool(mask.all()):
        return x[:, :, mask]
    return x


#: Intra-op threads for the statistics of CPU tensors. Their ops are memory-bound and
#: short, so a second thread costs more in synchronisation than it gains: on two
#: cores the statistics took 2.5x longer with two threads than with one (more under
#: load); the forward passes keep every thread.
STATS_THREADS = 1


@contextmanager
def threads_for(device: torch.device) -> Iterator[None]:
    """Run the block with at most :data:`STATS_THREADS` intra-op threads when ``device``
    is the CPU (other devices are left alone); the previous count is restored."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before <= STATS_THREADS:
        yield
        return
    torch.set_num_threads(STATS_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: Reused float32 work buffers, keyed by (images, channels, positions, device).
_WORKSPACES: dict[tuple, Tensor] = {}


def workspace(bsz: int, c: int, m: int, device: torch.device) -> Tensor:
    """A reused float32 buffer ``(B, 3, C, m)``: slot 0 takes ``a - shift_a``, slot 1
    ``b - shift_b`` and slot 2 ``a - b``, so that each pass below is one op over all
    three."""
    key = (bsz, c, m, str(device))
    buf = _WORKSPACES.get(key)
    if buf is None:
        if len(_WORKSPACES) > 32:
            _WORKSPACES.clear()
        buf = _WORKSPACES[key] = torch.empty(bsz, 3, c, m, device=device)
    return buf


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
        self._shift: Tensor | None = None  # (2, C) float32 reference of a and b

    def update(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> bool:
        """Add a batch. ``a = f(gX)`` and ``b = g·f(X)`` have the same shape: ``(B, C)``,
        ``(B, C, h, w)`` or ``(B, C, G, h, w)``; ``mask`` ``(h, w)`` marks valid positions.

        Statistics are taken in float32 on the input's device on data shifted by a
        per-channel reference (the mean of the first batch), then turned into raw sums
        in float64: shifted sums keep the correlation accurate when means are large
        compared to deviations (Chan et al.'s shift-invariant sums).

        Returns:
            False if the batch contained NaN or Inf (nothing is added then).
        """
        with threads_for(a.device):
            return self._update_all(per_image(a, mask), per_image(b, mask))

    def _update_all(self, ra: Tensor, rb: Tensor) -> bool:
        """:meth:`update` on ``(B, C, ...)`` tensors (:func:`per_image`), chunk by chunk."""
        bsz, c = ra.shape[:2]
        m = math.prod(ra.shape[2:])
        if m == 0 or bsz == 0:
            return True
        if self._shift is None:
            dims = tuple(d for d in range(ra.dim()) if d != 1)
            shift = torch.stack((ra.float().mean(dims), rb.float().mean(dims)))  # (2, C)
            if not bool(torch.isfinite(shift).all()):
                return False
            self._shift = shift
        # chunks of images small enough to stay in cache through the passes below
        step = min(bsz, max(1, CHUNK_ELEMENTS // max(1, c * m)))
        buf = workspace(step, c, m, ra.device)
        return all(self._update(ra[i : i + step], rb[i : i + step], buf)
                   for i in range(0, bsz, step))

    def _update(self, ra: Tensor, rb: Tensor, buf: Tensor) -> bool:
        """:meth:`update` on ``(B, C, ...)`` chunks with the work buffer ``buf``
        (:func:`workspace`): three subtractions into it, then one norm, one sum and one
        ``bmm``; every sum is then formed from small float64 tensors."""
        bsz, c = ra.shape[:2]
        buf = buf[:bsz]
        m = buf.shape[-1]
        shift = self._shift[(...,) + (None,) * (ra.dim() - 2)]  # (2, C, 1[, 1])
        torch.sub(ra, shift[0], out=buf[:, 0].view(ra.shape))
        torch.sub(rb, shift[1], out=buf[:, 1].view(ra.shape))
        torch.sub(ra, rb, out=buf[:, 2].view(ra.shape))
        # (B, 3, C): shifted squares of a and b, squared differences
        sq = torch.linalg.vector_norm(buf, dim=-1)
        gram = torch.bmm(buf[:, 0], buf[:, 1].transpose(1, 2))  # (B, C, C) shifted
        torch.abs(buf[:, 2], out=buf[:, 2])
        sums = buf.sum(-1)  # (B, 3, C): shifted sums of a and b, sums of |a - b|
        if not bool(torch.isfinite(sq).all()):
            return False
        self._add(gram.double(), sq.double().square(), sums.double(), m)
        return True

    def _add(self, gram: Tensor, sq: Tensor, sums: Tensor, m: int) -> None:
        """Turn one chunk's shifted float64 sums into raw sums and add them.

        Args:
            gram: ``(B, C, C)`` per-image shifted cross-products.
            sq: ``(B, 3, C)`` shifted squares of ``a``, ``b`` and squares of ``a - b``.
            sums: ``(B, 3, C)`` shifted sums of ``a``, ``b`` and sums of ``|a - b|``.
            m: positions per image.
        """
        bsz = gram.shape[0]
        ka, kb = self._shift.double()  # (C,) each
        sa_i, sb_i = sums[:, 0], sums[:, 1]  # (B, C) shifted sums per image
        # per-image global cosine over the valid C x positions entries, from raw sums:
        # sum(ab) = sum(sa sb) + ka sum(sb) + kb sum(sa) + m ka kb (all per channel)
        dot = (torch.diagonal(gram, dim1=1, dim2=2) + ka * sb_i + kb * sa_i
               + m * ka * kb).sum(-1)
        na = (sq[:, 0] + 2 * ka * sa_i + m * ka * ka).sum(-1)
        nb = (sq[:, 1] + 2 * kb * sb_i + m * kb * kb).sum(-1)
        cos = dot / torch.sqrt(na * nb).clamp_min(1e-24)
        s, t, n = sq.sum(0), sums.sum(0), bsz * m
        sca, scb = t[0], t[1]
        self.sab += (gram.sum(0) + torch.outer(ka, scb) + torch.outer(sca, kb)
                     + n * torch.outer(ka, kb)).cpu()
        self._vec += torch.stack((
            sca + n * ka, scb + n * kb,
            s[0] + 2 * ka * sca + n * ka * ka,
            s[1] + 2 * kb * scb + n * kb * kb,
            t[2], s[2])).cpu()
        self.n += n
        self.cos_sum += float(cos.sum())
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
