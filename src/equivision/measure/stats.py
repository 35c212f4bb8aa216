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
from dataclasses import dataclass

import torch
from torch import Tensor

#: Relative variance under which a channel counts as constant (excluded, counted).
CONSTANT_TOL = 1e-10
#: Elements per chunk of images in :meth:`PairStats.update` (about 2 MB of float32).
CHUNK_ELEMENTS = 1 << 19
#: Image groups kept for the bootstrap, replicates drawn, and the interval's level.
CI_GROUPS = 20
CI_REPLICATES = 200
CI_LEVEL = 0.95
#: Replicates x C x C elements evaluated at once in :meth:`PairStats.bootstrap`.
_BOOT_ELEMENTS = 1 << 21


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
    """Accumulated sums for ``C`` channels; see the module docstring.

    ``groups``: image groups kept for the bootstrap (0: none; :meth:`bootstrap` then
    gives no interval).
    """

    channels: int
    groups: int = 0
    n: float = 0.0
    images: float = 0.0
    cos_sum: float = 0.0

    def __post_init__(self) -> None:
        c, k = self.channels, max(0, int(self.groups))
        if k == 1:
            raise ValueError("groups must be 0 (no interval) or at least 2")
        # the per-channel sums are rows of one buffer, so that a batch adds with one op
        self._vec = torch.zeros(6, c, dtype=torch.float64)
        self._rows = self._vec.unbind(0)  # sa, sb, saa, sbb, sl1, sse
        self._sab = torch.zeros(c, c, dtype=torch.float64)
        self._shift: Tensor | None = None  # (2, C) float32 reference of a and b
        # per group: (K, 3) n, images, cos_sum; (K, 6, C) as _vec; (K, C, C) as sab
        self._g_head = torch.zeros(k, 3, dtype=torch.float64)
        self._g_vec = torch.zeros(k, 6, c, dtype=torch.float64)
        self._g_sab = torch.zeros(k, c, c, dtype=torch.float64)
        # shifted sums per group not yet turned into raw sums (:meth:`_flush`), on the
        # statistics' device: gram (K', C, C), squares (K', 3, C), sums (K', 3, C),
        # head (K', 3), with K' = max(1, groups)
        self._pending: list[Tensor] | None = None

    # raw sums, brought up to date on every read
    @property
    def sa(self) -> Tensor:
        """``(C,)`` sums of ``a``."""
        return self._row(0)

    @property
    def sb(self) -> Tensor:
        """``(C,)`` sums of ``b``."""
        return self._row(1)

    @property
    def saa(self) -> Tensor:
        """``(C,)`` sums of ``a^2``."""
        return self._row(2)

    @property
    def sbb(self) -> Tensor:
        """``(C,)`` sums of ``b^2``."""
        return self._row(3)

    @property
    def sl1(self) -> Tensor:
        """``(C,)`` sums of ``|a - b|``."""
        return self._row(4)

    @property
    def sse(self) -> Tensor:
        """``(C,)`` sums of ``(a - b)^2``."""
        return self._row(5)

    @property
    def sab(self) -> Tensor:
        """``(C, C)`` cross-products ``sum a_c b_c'``."""
        self._flush()
        return self._sab

    def _row(self, i: int) -> Tensor:
        self._flush()
        return self._rows[i]

    def update(self, a: Tensor, b: Tensor, mask: Tensor | None = None,
               groups: Tensor | None = None) -> bool:
        """Add a batch. ``a = f(gX)`` and ``b = g·f(X)`` have the same shape: ``(B, C)``,
        ``(B, C, h, w)`` or ``(B, C, G, h, w)``; ``mask`` ``(h, w)`` marks valid positions;
        ``groups`` ``(B,)`` integer group of each image (with ``groups=K``; default
        round-robin over the images seen).

        Statistics are taken in float32 on the input's device on data shifted by a
        per-channel reference (the mean of the first batch), then turned into raw sums
        in float64: shifted sums keep the correlation accurate when means are large
        compared to deviations (Chan et al.'s shift-invariant sums).

        Returns:
            False if the batch contained NaN or Inf (nothing is added then).
        """
        ids = self._group_ids(a.shape[0], groups, a.device)
        with threads_for(a.device):
            if a is b:  # a map with itself (the redundancy baseline): a third of the work
                ra = per_image(a, mask)
                return self._update_all(ra, ra, ids)
            return self._update_all(per_image(a, mask), per_image(b, mask), ids)

    def _group_ids(self, bsz: int, groups: Tensor | None, device: torch.device) -> Tensor:
        """``(B,)`` long group of each image on ``device`` (all 0 without groups)."""
        k = self.groups
        if not k:
            return torch.zeros(bsz, dtype=torch.long, device=device)
        if groups is None:
            groups = (int(self.images) + torch.arange(bsz)) % k
        groups = torch.as_tensor(groups, dtype=torch.long).to(device)
        if groups.shape != (bsz,) or bool(((groups < 0) | (groups >= k)).any()):
            raise ValueError(f"groups must be {bsz} integers in [0, {k}), got "
                             f"{tuple(groups.shape)}")
        return groups

    def _update_all(self, ra: Tensor, rb: Tensor, ids: Tensor) -> bool:
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
        update = self._update_same if ra is rb else self._update
        return all(update(ra[i : i + step], rb[i : i + step], buf, ids[i : i + step])
                   for i in range(0, bsz, step))

    def _update(self, ra: Tensor, rb: Tensor, buf: Tensor, ids: Tensor) -> bool:
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
        self._add(gram.double(), sq.double().square(), sums.double(), m, ids)
        return True

    def _update_same(self, ra: Tensor, rb: Tensor, buf: Tensor, ids: Tensor) -> bool:
        """:meth:`_update` when ``a`` is ``b`` (``rb`` is not read): one subtraction, norm,
        sum and ``bmm`` on slot 0 of ``buf``; ``b``'s sums are ``a``'s and ``a - b`` is 0."""
        bsz = ra.shape[0]
        work = buf[:bsz, 0]
        shift = self._shift[0][(...,) + (None,) * (ra.dim() - 2)]  # (C, 1[, 1])
        torch.sub(ra, shift, out=work.view(ra.shape))
        sq = torch.linalg.vector_norm(work, dim=-1)  # (B, C)
        if not bool(torch.isfinite(sq).all()):
            return False
        gram = torch.bmm(work, work.transpose(1, 2))  # (B, C, C) shifted
        total = work.sum(-1)  # (B, C)
        zero = torch.zeros_like(sq)
        self._add(gram.double(), torch.stack((sq, sq, zero), 1).double().square(),
                  torch.stack((total, total, zero), 1).double(), work.shape[-1], ids)
        return True

    def _add(self, gram: Tensor, sq: Tensor, sums: Tensor, m: int, ids: Tensor) -> None:
        """Add one chunk's shifted float64 sums into the pending sums of each image's
        group (one ``index_add_`` each; :meth:`_flush` turns them into raw sums when
        they are read), and the per-image global cosines.

        Args:
            gram: ``(B, C, C)`` per-image shifted cross-products.
            sq: ``(B, 3, C)`` shifted squares of ``a``, ``b`` and squares of ``a - b``.
            sums: ``(B, 3, C)`` shifted sums of ``a``, ``b`` and sums of ``|a - b|``.
            m: positions per image.
            ids: ``(B,)`` group of each image.
        """
        ka, kb = self._shift.double()  # (C,) each
        sa_i, sb_i = sums[:, 0], sums[:, 1]  # (B, C) shifted sums per image
        # per-image global cosine over the valid C x positions entries, from raw sums:
        # sum(ab) = sum(sa sb) + ka sum(sb) + kb sum(sa) + m ka kb (all per channel)
        dot = (torch.diagonal(gram, dim1=1, dim2=2) + ka * sb_i + kb * sa_i
               + m * ka * kb).sum(-1)
        na = (sq[:, 0] + 2 * ka * sa_i + m * ka * ka).sum(-1)
        nb = (sq[:, 1] + 2 * kb * sb_i + m * kb * kb).sum(-1)
        cos = dot / torch.sqrt(na * nb).clamp_min(1e-24)
        head = torch.stack((torch.full_like(cos, float(m)), torch.ones_like(cos), cos), 1)
        if self._pending is None:
            k = max(1, self.groups)
            self._pending = [gram.new_zeros(k, *t.shape[1:]) for t in (gram, sq, sums, head)]
        for buf, t in zip(self._pending, (gram, sq, sums, head)):
            buf.index_add_(0, ids, t)
        self.n += float(m * len(cos))
        self.images += float(len(cos))
        self.cos_sum += float(cos.sum())

    def _flush(self) -> None:
        """Turn the pending shifted sums into raw sums (linear in them for the fixed
        shift ``k``: ``sum ab = G + k_a sum b' + k_b sum a' + n k_a k_b``, with primes
        for shifted values) and add them, in total and per group."""
        if self._pending is None:
            return
        g, s, t, head = self._pending
        self._pending = None
        ka, kb = self._shift.double()  # (C,) each
        n = head[:, 0]
        sca, scb = t[:, 0], t[:, 1]  # (K, C)
        nk = n[:, None]
        sab = (g + ka[:, None] * scb[:, None, :] + sca[:, :, None] * kb
               + n[:, None, None] * torch.outer(ka, kb)).cpu()
        vec = torch.stack((
            sca + nk * ka, scb + nk * kb,
            s[:, 0] + 2 * ka * sca + nk * ka * ka,
            s[:, 1] + 2 * kb * scb + nk * kb * kb,
            t[:, 2], s[:, 2]), 1).cpu()  # (K, 6, C)
        self._sab += sab.sum(0)
        self._vec += vec.sum(0)
        if self.groups:
            self._g_sab += sab
            self._g_vec += vec
            self._g_head += head.cpu()

    # ---- reduction across processes ------------------------------------------
    def flat(self) -> Tensor:
        """All sums (with the groups') as one float64 vector (for ``all_reduce``)."""
        self._flush()
        head = torch.tensor([self.n, self.images, self.cos_sum], dtype=torch.float64)
        parts = [head, self.sa, self.sb, self.saa, self.sbb, self.sl1, self.sse,
                 self.sab.reshape(-1), self._g_head.reshape(-1), self._g_vec.reshape(-1),
                 self._g_sab.reshape(-1)]
        return torch.cat(parts)

    def load_flat(self, v: Tensor) -> None:
        """Inverse of :meth:`flat`."""
        c = self.channels
        v = v.double().cpu()
        self._pending = None  # the state is replaced
        self.n, self.images, self.cos_sum = (float(t) for t in v[:3])
        self._vec.copy_(v[3 : 3 + 6 * c].reshape(6, c))  # sa, sb, saa, sbb, sl1, sse
        o = 3 + 6 * c
        self._sab.copy_(v[o : o + c * c].reshape(c, c))
        o += c * c
        for buf in (self._g_head, self._g_vec, self._g_sab):
            buf.copy_(v[o : o + buf.numel()].reshape(buf.shape))
            o += buf.numel()

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
        and ``per_channel`` lists: ``invariance``, ``equivariance`` and ``match`` (the
        channel ``c'`` of ``g·f(X)`` that reaches channel ``c``'s equivariance).
        """
        self._flush()
        if self.n == 0:
            raise ValueError("no samples were accumulated")
        head = torch.tensor([self.n, self.images, self.cos_sum], dtype=torch.float64)
        out, per = _pair_metrics(head, self._vec, self.sab)
        layer = {k: _num(v) for k, v in out.items()}
        layer["n_constant"] = int(per["n_constant"])
        eq_ok = per["eq_ok"].tolist()
        layer["per_channel"] = {
            "invariance": _lst(per["diag"], per["inv_ok"]),
            "equivariance": _lst(per["eq"], per["eq_ok"]),
            "match": [int(j) if ok else None for j, ok in zip(per["match"].tolist(), eq_ok)],
        }
        return layer

    def redundancy(self) -> dict:
        """For stats fed the same map twice (``a = b = f(X)``): ``redundancy``, the mean
        over non-constant channels ``c`` of ``max_{c' != c} corr(f(X)_c, f(X)_c')``
        (None with fewer than two non-constant channels), and ``per_channel`` lists
        ``redundancy`` and ``redundant_with`` (that ``c'``)."""
        self._flush()
        if self.n == 0:
            raise ValueError("no samples were accumulated")
        red, ok, match = _redundancy(torch.tensor(self.n, dtype=torch.float64), self._vec,
                                     self.sab)
        return {"redundancy": _num(_masked_mean(red, ok)),
                "per_channel": {"redundancy": _lst(red, ok),
                                "redundant_with": [int(j) if k else None for j, k in
                                                   zip(match.tolist(), ok.tolist())]}}

    def bootstrap(self, kind: str = "pair", replicates: int = CI_REPLICATES,
                  level: float = CI_LEVEL, seed: int = 0) -> dict[str, list[float] | None]:
        """Percentile bootstrap intervals over images: the groups are drawn with
        replacement ``replicates`` times (seeded), and each replicate's metrics come
        from its weighted group sums.

        Args:
            kind: ``"pair"`` for the layer metrics of :meth:`metrics`, ``"redundancy"``
                for :meth:`redundancy`'s.

        Returns:
            ``{metric: [low, high]}`` (None where undefined in most replicates); ``{}``
            with fewer than two groups holding images.
        """
        if kind not in ("pair", "redundancy"):
            raise ValueError(f"kind must be 'pair' or 'redundancy', got {kind!r}")
        self._flush()
        keep = torch.nonzero(self._g_head[:, 1] > 0).flatten()
        if len(keep) < 2:
            return {}
        head, vec, sab = self._g_head[keep], self._g_vec[keep], self._g_sab[keep]
        k, c = len(keep), self.channels
        gen = torch.Generator().manual_seed(seed)
        draws = torch.randint(k, (replicates, k), generator=gen)
        weights = torch.zeros(replicates, k, dtype=torch.float64).scatter_add_(
            1, draws, torch.ones(replicates, k, dtype=torch.float64))
        step = max(1, _BOOT_ELEMENTS // max(1, c * c))
        values: dict[str, list[Tensor]] = {}
        for i in range(0, replicates, step):
            w = weights[i : i + step]
            h, v = w @ head, torch.einsum("rk,kxc->rxc", w, vec)
            s = torch.einsum("rk,kij->rij", w, sab)
            if kind == "pair":
                out = _pair_metrics(h, v, s)[0]
            else:
                red, ok, _ = _redundancy(h[:, 0], v, s)
                out = {"redundancy": _masked_mean(red, ok)}
            for name, val in out.items():
                values.setdefault(name, []).append(val)
        names = list(values)
        val = torch.stack([torch.cat(values[k]) for k in names])  # (metrics, replicates)
        val = val.masked_fill(~torch.isfinite(val), float("nan"))
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        bounds = torch.nanquantile(val, q, dim=1).T.tolist()  # (metrics, 2)
        enough = (~torch.isnan(val)).sum(1) >= replicates // 2
        return {k: b if ok else None for k, b, ok in zip(names, bounds, enough.tolist())}


def _num(v: Tensor) -> float | None:
    """A 0-d tensor as a float, None where NaN."""
    x = float(v)
    return None if math.isnan(x) else x


def _lst(v: Tensor, ok: Tensor) -> list[float | None]:
    return [float(x) if k else None for x, k in zip(v.tolist(), ok.tolist())]


def _masked_mean(v: Tensor, ok: Tensor) -> Tensor:
    """Mean of ``v (..., C)`` over the channels where ``ok``; NaN where none is."""
    k = ok.sum(-1)
    s = torch.where(ok, v, torch.zeros_like(v)).sum(-1)
    return torch.where(k > 0, s / k.clamp_min(1), torch.full_like(s, float("nan")))


def _correlations(n: Tensor, vec: Tensor, sab: Tensor) -> tuple[Tensor, ...]:
    """Pearson correlations from raw sums, with leading batch axes ``...``.

    Args:
        n: ``(...)`` samples; vec: ``(..., 6, C)`` sums as ``PairStats._vec``;
        sab: ``(..., C, C)`` cross-products.

    Returns:
        ``corr (..., C, C)`` (NaN in rows / columns of constant channels), ``live_a``,
        ``live_b`` ``(..., C)`` and ``mean_b (..., C)``.
    """
    n1 = n[..., None]
    mean_a, mean_b = vec[..., 0, :] / n1, vec[..., 1, :] / n1
    var_a = (vec[..., 2, :] / n1 - mean_a**2).clamp_min(0)
    var_b = (vec[..., 3, :] / n1 - mean_b**2).clamp_min(0)
    live_a = var_a > CONSTANT_TOL * (1.0 + mean_a**2)
    live_b = var_b > CONSTANT_TOL * (1.0 + mean_b**2)
    cov = sab / n1[..., None] - mean_a[..., :, None] * mean_b[..., None, :]
    denom = torch.sqrt(var_a[..., :, None] * var_b[..., None, :]).clamp_min(1e-300)
    corr = (cov / denom).clamp(-1.0, 1.0)
    dead = ~live_a[..., :, None] | ~live_b[..., None, :]
    corr = corr.masked_fill(dead, float("nan"))
    return corr, live_a, live_b, mean_b


def _pair_metrics(head: Tensor, vec: Tensor, sab: Tensor) -> tuple[dict[str, Tensor], dict]:
    """The layer metrics of :meth:`PairStats.metrics` from raw sums with leading batch
    axes ``...`` (bootstrap replicates): ``head (..., 3)`` n, images, cos_sum; ``vec``
    ``(..., 6, C)``; ``sab (..., C, C)``. Returns ``({metric: (...)}, per-channel
    tensors)``; undefined values are NaN."""
    n, images, cos_sum = head.unbind(-1)
    c = vec.shape[-1]
    corr, live_a, live_b, mean_b = _correlations(n, vec, sab)
    diag = torch.diagonal(corr, dim1=-2, dim2=-1)
    inv_ok = live_a & live_b
    eq, match = corr.masked_fill(~live_b[..., None, :], -float("inf")).max(-1)
    eq_ok = live_a & live_b.any(-1, keepdim=True)
    saa, sbb = vec[..., 2, :], vec[..., 3, :]
    norm = torch.sqrt(saa[..., :, None] * sbb[..., None, :]).clamp_min(1e-300)
    cosm = sab / norm
    nz_a, nz_b = saa > 0, sbb > 0
    cos_eq = cosm.masked_fill(~nz_b[..., None, :], -float("inf")).amax(-1)
    mse = vec[..., 5, :].sum(-1) / (n * c)
    ms_b = sbb.sum(-1) / (n * c)
    nan = torch.full_like(mse, float("nan"))
    out = {
        "invariance": _masked_mean(diag, inv_ok),
        "equivariance": _masked_mean(eq, eq_ok),
        "invariance_cosine": _masked_mean(torch.diagonal(cosm, dim1=-2, dim2=-1), nz_a & nz_b),
        "equivariance_cosine": _masked_mean(cos_eq, nz_a & nz_b.any(-1, keepdim=True)),
        "mse": mse,
        "l1": vec[..., 4, :].sum(-1) / (n * c),
        "nmse": torch.where(ms_b > 0, mse / ms_b.clamp_min(1e-300), nan),
        "cosine": torch.where(images > 0, cos_sum / images.clamp_min(1), nan),
        "activation": (mean_b.abs()).mean(-1),
    }
    per = {"diag": diag, "inv_ok": inv_ok, "eq": eq, "eq_ok": eq_ok, "match": match,
           "n_constant": (~inv_ok).sum(-1)}
    return out, per


def _redundancy(n: Tensor, vec: Tensor, sab: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``max_{c' != c}`` correlation of each channel with the others of the same map
    (sums of ``a = b``), with leading batch axes: ``(..., C)`` values, ``ok`` mask and
    the ``c'`` reaching it."""
    corr, live, _, _ = _correlations(n, vec, sab)
    eye = torch.eye(corr.shape[-1], dtype=torch.bool)
    off = corr.masked_fill(eye | ~live[..., None, :], -float("inf"))
    red, match = off.max(-1)
    ok = live & torch.isfinite(red)
    return red, ok, match
