"""View policies for SSL with soft equivariance regularization.

* :class:`BasePolicy` (T): random resized crop, horizontal flip, colour jitter,
  grayscale, Gaussian blur, solarization — the usual invariance pipeline, with
  parameters suited to small images.
* :class:`EquivariantPolicy` (T_eq): no crop; anisotropic scaling, horizontal flip,
  90° rotations, then the same photometric jitter as T.  Every view records its
  geometric element ``g`` (an :class:`equivision.transforms.Transform`: ``Dihedral ∘
  Scale``).  By default (``canvas="resize"``, the paper's "anisotropic scaling without
  cropping" as its released code does it) the whole image is resized to a
  patch-aligned canvas (:func:`canvas_grids`: token area 0.7-1.3 N, aspect 3/4-4/3), so
  views have different sizes (:attr:`ViewBatch.eq_views`) and the relative element
  acts on token maps by resizing the whole map (:func:`act_on_canvas`);
  ``canvas="fixed"`` scales on the input's own canvas instead (zoom-out pads, zoom-in
  crops; factors snapped so that the content stays on the patch grid), with
  :func:`pair_valid_masks` keeping padding out of SER.
* :class:`ViewSampler` partitions a batch: the first ``M = round(r·B)`` images use
  T_eq (both views), the rest T; it returns a :class:`ViewBatch` with
  ``relative = g2 ∘ g1⁻¹`` per equivariant image, so that ``g(view1) ≈ view2``.
  With ``n_local > 0`` (multi-crop) it adds that many small local views of every image
  (:func:`local_policy`: T with crops of 5-40 % of the area, resized to ``local_size``),
  which feed only the base SSL loss.

Per-image elements (the views' flips, rotations and scalings) act through
:class:`equivision.transforms.elements.ElementBatch`, batched by equal elements.

All randomness comes from the ``torch.Generator`` passed to ``__call__`` (CPU
generator; the images may live on any device), so views are reproducible.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import kornia.color as KC
import kornia.enhance as KE
import kornia.filters as KF
import kornia.geometry.transform as KT
import torch
import torch.nn.functional as F
from torch import Tensor

from ..transforms import Compose, Dihedral, Scale, Transform, check_image
from ..transforms.elements import ElementBatch

__all__ = [
    "BasePolicy", "EquivariantPolicy", "LOCAL_CROP_SCALE", "Photometric", "ViewBatch",
    "ViewSampler", "act_on_canvas", "canvas_grids", "canvas_shape", "check_patch_aligned",
    "geometric_params", "local_policy", "pair_valid_masks", "patch_aligned_scales",
    "resize_view",
]

#: area range of multi-crop's local views (DINO's 0.05-0.4)
LOCAL_CROP_SCALE = (0.05, 0.4)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coin(n: int, p: float, gen: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=gen) < p


# ---------------------------------------------------------------------------------
# photometric part (shared by T and T_eq)
# ---------------------------------------------------------------------------------
@dataclass
class Photometric:
    """Random photometric jitter, applied per image.

    Attributes:
        jitter_p: probability of colour jitter; ``brightness`` (additive, ±),
            ``contrast`` and ``saturation`` (multiplicative, 1 ± value) and ``hue``
            (± fraction of a full turn) give the ranges.  Saturation and hue apply to
            RGB images only.
        grayscale_p: probability of converting to grayscale (RGB only).
        blur_p, blur_sigma: probability and sigma range of a Gaussian blur (kernel
            3x3 for small images).
        solarize_p: probability of solarization (``x -> 1 - x`` above 0.5).
    """

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    solarize_p: float = 0.1

    @classmethod
    def off(cls) -> Photometric:
        """No photometric change at all."""
        return cls(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """Jitter ``x (B, C, H, W)`` in [0, 1]; returns the same shape, in [0, 1]."""
        b, c = x.shape[:2]
        dev = x.device

        def col(v: Tensor) -> Tensor:
            return v.to(dev, x.dtype)

        jit = col(_coin(b, self.jitter_p, gen).float())
        bright = col(_uniform(b, -self.brightness, self.brightness, gen)) * jit
        contrast = 1 + col(_uniform(b, -self.contrast, self.contrast, gen)) * jit
        sat = 1 + col(_uniform(b, -self.saturation, self.saturation, gen)) * jit
        hue = col(_uniform(b, -self.hue, self.hue, gen)) * jit * 2 * math.pi
        gray = _coin(b, self.grayscale_p, gen).to(dev)
        blur = _coin(b, self.blur_p, gen).to(dev)
        sigma = col(_uniform(b, *self.blur_sigma, gen))
        sol = _coin(b, self.solarize_p, gen).to(dev)
        if self.jitter_p > 0:
            x = KE.adjust_brightness(x, bright)
            x = KE.adjust_contrast(x, contrast)
            if c == 3:
                x = KE.adjust_saturation(x, sat)
                x = KE.adjust_hue(x, hue)
            x = x.clamp(0, 1)
        if c == 3 and self.grayscale_p > 0 and gray.any():
            g = KC.rgb_to_grayscale(x).expand_as(x)
            x = torch.where(gray[:, None, None, None], g, x)
        if self.blur_p > 0 and blur.any():
            s = sigma[:, None].expand(b, 2).contiguous()
            blurred = KF.gaussian_blur2d(x, (3, 3), s)
            x = torch.where(blur[:, None, None, None], blurred, x)
        if self.solarize_p > 0 and sol.any():
            x = torch.where(sol[:, None, None, None] & (x >= 0.5), 1 - x, x)
        return x


# ---------------------------------------------------------------------------------
# policies
# ---------------------------------------------------------------------------------
class BasePolicy:
    """T: random resized crop (area ``crop_scale``, aspect ``ratio``) back to the
    input size (or to ``size x size``), horizontal flip with ``flip_p``, then
    :class:`Photometric`."""

    def __init__(
        self, crop_scale: tuple[float, float] = (0.25, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
        photometric: Photometric | None = None, size: int | None = None,
    ) -> None:
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        if size is not None and size < 1:
            raise ValueError(f"size must be None or >= 1, got {size}")
        self.crop_scale, self.ratio, self.flip_p, self.size = crop_scale, ratio, flip_p, size
        self.photometric = Photometric() if photometric is None else photometric

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        """One view of every image of ``x (B, C, H, W)``: ``(B, C, H, W)``, or
        ``(B, C, size, size)`` with ``size``."""
        check_image(x)
        b, _, h, w = x.shape
        area = _uniform(b, *self.crop_scale, gen)
        logr = _uniform(b, math.log(self.ratio[0]), math.log(self.ratio[1]), gen)
        cw = (torch.sqrt(area * torch.exp(logr)) * w).clamp(1, w)
        ch = (torch.sqrt(area / torch.exp(logr)) * h).clamp(1, h)
        x0 = torch.rand(b, generator=gen) * (w - cw)
        y0 = torch.rand(b, generator=gen) * (h - ch)
        x1, y1 = x0 + cw - 1, y0 + ch - 1
        boxes = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                             torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], 1)
        shape = (h, w) if self.size is None else (self.size, self.size)
        out = KT.crop_and_resize(x, boxes.to(x.device, x.dtype), shape)
        flips = ElementBatch(Dihedral(0, f) for f in _coin(b, self.flip_p, gen).tolist())
        return self.photometric(flips.apply_image(out), gen)


def local_policy(size: int, patch_size: int) -> BasePolicy:
    """Multi-crop's local views: T with crops of :data:`LOCAL_CROP_SCALE` of the area,
    resized to ``size x size`` (a multiple of ``patch_size``, so the ViT sees a smaller
    token grid with its positional embedding interpolated)."""
    if size < patch_size or size % patch_size:
        fit = max(1, size // patch_size) * patch_size
        raise ValueError(f"the local crop size {size} must be a positive multiple of the "
                         f"patch size {patch_size}; use e.g. {fit}")
    return BasePolicy(crop_scale=LOCAL_CROP_SCALE, size=size)


def patch_aligned_scales(
    image_size: int, patch_size: int, scale_range: tuple[float, float] = (0.7, 1.3)
) -> list[float]:
    """Scale factors in ``scale_range`` that keep a centred scaled image on the patch
    grid: the content spans ``h + 2k`` patches of an ``h``-patch side, so its edges
    fall on patch boundaries.  E.g. 224 px / 16 → ``[10/14, 12/14, 1, 16/14, 18/14]``;
    32 px / 4 → ``[0.75, 1, 1.25]``; 16 px / 4 → ``[1]``."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    side = image_size // patch_size
    lo, hi = scale_range
    if not 0 < lo <= 1 <= hi:
        raise ValueError(f"scale_range must contain 1 and be positive, got {scale_range}")
    ks = range(-(side // 2), side + 1)
    return [(side + 2 * k) / side for k in ks if lo - 1e-9 <= (side + 2 * k) / side <= hi + 1e-9]


def canvas_grids(
    side: int | tuple[int, int], area: tuple[float, float] = (0.7, 1.3),
    aspect: tuple[float, float] = (3 / 4, 4 / 3),
) -> list[tuple[int, int]]:
    """Token grids ``(h, w)`` of the resized canvases of T_eq without cropping (the
    paper's "anisotropic scaling without cropping", as in its released code): token
    area ``h·w`` in ``area`` times ``N`` (the native grid's) and aspect ``w / h`` in
    ``aspect``.  E.g. an 8 x 8 grid (32 px, 4 px patches) gives 13 canvases with per-axis
    scales 6/8 .. 10/8, against ``{0.75, 1, 1.25}`` on a fixed canvas."""
    h0, w0 = (side, side) if isinstance(side, int) else side
    n = h0 * w0
    lo, hi = area
    out = []
    for h in range(1, 2 * h0 + 1):
        for w in range(1, 2 * w0 + 1):
            if lo * n - 1e-9 <= h * w <= hi * n + 1e-9 and \
                    aspect[0] - 1e-9 <= w / h <= aspect[1] + 1e-9:
                out.append((h, w))
    return out


def check_patch_aligned(scale: float, image_size: int, patch_size: int) -> None:
    """Raise ``ValueError`` unless ``scale`` keeps the scaled image on the patch grid."""
    side = image_size // patch_size
    span = scale * side
    if abs(span - round(span)) > 1e-6 or (round(span) - side) % 2:
        ok = patch_aligned_scales(image_size, patch_size, (0.5, 1.5))
        raise ValueError(
            f"scale {scale:g} leaves the patch grid: a {image_size} px image with "
            f"{patch_size} px patches would span {span:g} patches (needs {side} ± an even "
            f"number); use factors (h + 2k)/h such as {[round(s, 4) for s in ok]}"
        )


class EquivariantPolicy:
    """T_eq: no crop; anisotropic scale, horizontal flip, 90° rotation, photometric.

    Args:
        image_size, patch_size: the encoder's input and patch size (for snapping).
        scale_range: range of the per-axis scale factors; they are drawn from the
            patch-aligned factors in it (:func:`patch_aligned_scales`).
        scales: explicit per-axis factors instead (each must be patch aligned); with
            ``canvas="resize"`` they select the canvases whose sides they give.
        flip_p: probability of a horizontal flip.
        rotations: allow 90° rotations (k uniform in 0..3).
        photometric: the photometric jitter (default as in T; ``Photometric.off()``).
        canvas: ``"fixed"`` scales on the input's own canvas (zoom-out pads the border,
            zoom-in crops it; factors from ``scales`` / ``scale_range``); ``"resize"``
            resizes the whole image to a canvas of :func:`canvas_grids` (token area in
            ``area``, aspect in ``aspect``), without cropping or padding (the paper's
            T_eq): views then have different sizes and come back as lists.
    """

    def __init__(
        self, image_size: int, patch_size: int,
        scale_range: tuple[float, float] = (0.7, 1.3), scales: Sequence[float] | None = None,
        flip_p: float = 0.5, rotations: bool = True, photometric: Photometric | None = None,
        canvas: str = "resize", area: tuple[float, float] = (0.7, 1.3),
        aspect: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.image_size, self.patch_size = image_size, patch_size
        if canvas not in ("fixed", "resize"):
            raise ValueError(f"canvas must be 'fixed' or 'resize', got {canvas!r}")
        self.canvas = canvas
        side = image_size // patch_size
        self.grids = canvas_grids(side, area, aspect) if canvas == "resize" else [(side, side)]
        if canvas == "resize" and scales is not None:  # keep the canvases of these factors
            sides = {round(float(f) * side) for f in scales}
            self.grids = [(h, w) for h, w in self.grids if h in sides and w in sides]
            if not self.grids:
                raise ValueError(f"no canvas of {canvas_grids(side, area, aspect)} has sides "
                                 f"{sorted(sides)} (scales {list(scales)} of {side} tokens)")
        if canvas == "resize":
            self.scales = [1.0]
        elif scales is None:
            self.scales = patch_aligned_scales(image_size, patch_size, scale_range)
            if len(self.scales) == 1 and scale_range[0] < scale_range[1]:
                warnings.warn(
                    f"no patch-aligned scale factor other than 1 lies in {scale_range} for "
                    f"{image_size} px images with {patch_size} px patches; T_eq will not "
                    "scale (use larger images or a wider range)", stacklevel=2,
                )
        else:
            for s in scales:
                check_patch_aligned(float(s), image_size, patch_size)
            self.scales = [float(s) for s in scales]
        self.flip_p, self.rotations = flip_p, rotations
        self.photometric = Photometric() if photometric is None else photometric

    def sample(self, n: int, gen: torch.Generator | None = None) -> list[Transform]:
        """``n`` geometric elements ``Dihedral(k, flip) ∘ Scale(sx, sy)``; with
        ``canvas="resize"`` the scale is the canvas's ``(w / w0, h / h0)``."""
        if self.canvas == "resize":
            side = self.image_size // self.patch_size
            pick = torch.randint(len(self.grids), (n,), generator=gen)
            factors = [(self.grids[i][1] / side, self.grids[i][0] / side) for i in pick.tolist()]
        else:
            nsc = len(self.scales)
            ix = torch.randint(nsc, (n,), generator=gen).tolist()
            iy = torch.randint(nsc, (n,), generator=gen).tolist()
            factors = [(self.scales[a], self.scales[b]) for a, b in zip(ix, iy)]
        flip = _coin(n, self.flip_p, gen)
        ks = torch.randint(4 if self.rotations else 1, (n,), generator=gen)
        return [_clean(Dihedral(int(ks[i]), bool(flip[i])) @ Scale(*factors[i]))
                for i in range(n)]

    def __call__(
        self, x: Tensor, gen: torch.Generator | None = None
    ) -> tuple[Tensor | list[Tensor], list[Transform]]:
        """One view of every image of ``x (B, C, H, W)`` and its geometric elements: a
        ``(B, C, H, W)`` tensor, or with ``canvas="resize"`` a list of ``B`` views
        ``(C, H_i, W_i)`` (patch-aligned sizes)."""
        check_image(x)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"T_eq was built for {self.image_size} px images, got "
                             f"{tuple(x.shape[-2:])}")
        gs = self.sample(x.shape[0], gen)
        if self.canvas == "fixed":
            return self.photometric(ElementBatch(gs).apply_image(x), gen), gs
        views = [resize_view(x[i : i + 1], g, self.image_size) for i, g in enumerate(gs)]
        return [self.photometric(v, gen)[0] for v in views], gs


def canvas_shape(g: Transform, size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` of the canvas ``g = Dihedral ∘ Scale(sx, sy)`` resizes a ``size`` map or
    image to (before its dihedral part, which may swap the axes afterwards)."""
    h0, w0 = (size, size) if isinstance(size, int) else size
    _, _, sx, sy = geometric_params(g)
    return round(h0 * sy), round(w0 * sx)


def resize_view(x: Tensor, g: Transform, size: int | tuple[int, int]) -> Tensor:
    """Act with ``g = Dihedral ∘ Scale(sx, sy)`` without cropping: resize the whole of
    ``x (B, C, H, W)`` to the canvas :func:`canvas_shape`, then rotate / flip; returns
    ``(B, C, H', W')``.  On token maps this is the action of T_eq with
    ``canvas="resize"``."""
    k, flip, _, _ = geometric_params(g)
    shape = canvas_shape(g, size)
    if tuple(x.shape[-2:]) != shape:
        x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False,
                          antialias=shape[0] < x.shape[-2] or shape[1] < x.shape[-1])
    return _dihedral(x, k, flip)


def _dihedral(x: Tensor, k: int, flip: bool) -> Tensor:
    """``Dihedral(k, flip)`` on a map ``(..., h, w)`` of any shape (rectangular too;
    odd ``k`` swaps the axes): flip left-right, then ``torch.rot90`` by ``k``."""
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x


def act_on_canvas(g1: Transform, g2: Transform, x: Tensor, target: tuple[int, int]) -> Tensor:
    """``g = g2 ∘ g1⁻¹`` acting on view 1's token map ``x (B, D, h, w)`` when both views
    were made by :func:`resize_view` (``g_v = D_v ∘ S_v``) and view 2's map is ``target =
    (h', w')``: undo ``D_1``, resize the whole map to ``D_2⁻¹(target)`` (bilinear, no
    cropping or padding, as the released code does), apply ``D_2``; ``(B, D, h', w')``."""
    k1, f1, _, _ = geometric_params(g1)
    k2, f2, _, _ = geometric_params(g2)
    inv = Dihedral(k1, f1).inverse()
    x = _dihedral(x, inv.k, inv.flip)
    pre = (target[1], target[0]) if k2 % 2 else tuple(target)
    if tuple(x.shape[-2:]) != pre:
        x = F.interpolate(x, size=pre, mode="bilinear", align_corners=False)
    return _dihedral(x, k2, f2)


def _clean(t: Transform) -> Transform:
    """Simplify a composition and round scale factors (so that S·S⁻¹ is the identity)."""
    for _ in range(4):  # simplify() is one pass: dropping S·S⁻¹ can make D, D neighbours
        parts = t.transforms if isinstance(t, Compose) else [t]
        fixed = [Scale(round(p.sx, 9), round(p.sy, 9), p.mode) if isinstance(p, Scale) else p
                 for p in parts]
        t = Compose(fixed).simplify()
    return t


def geometric_params(t: Transform) -> tuple[int, bool, float, float]:
    """``(k, flip, sx, sy)`` of an element ``Dihedral(k, flip) ∘ Scale(sx, sy)`` as made
    by :class:`EquivariantPolicy` (either part may be missing)."""
    parts = t.transforms if isinstance(t, Compose) else [t]
    k, flip, sx, sy = 0, False, 1.0, 1.0
    for p in parts:
        if isinstance(p, Dihedral):
            k, flip = p.k, p.flip
        elif isinstance(p, Scale):
            sx, sy = p.sx, p.sy
        else:
            raise TypeError(f"not an element of T_eq's geometric group: {p!r}")
    return k, flip, sx, sy


def pair_valid_masks(g1: Sequence[Transform], g2: Sequence[Transform],
                     relative: Sequence[Transform], shape: tuple[int, int],
                     device: torch.device | str | None = None) -> Tensor:
    """``(M, h, w)`` bool: positions ``j`` of ``g·map1`` (``g = g2 ∘ g1⁻¹``) where both
    ``(g·map1)_j`` and ``map2_j`` come from image content, on token maps of ``shape``.

    A view zoomed out on a fixed canvas is zero-padded at its border; view ``v``'s
    content mask is ``g_v``'s valid mask. View 1's mask is moved by ``g`` (which also
    drops the positions ``g`` fills from outside the map) and intersected with view 2's,
    so no anchor or positive is built from padding."""
    if not len(relative):
        return torch.zeros(0, *shape, dtype=torch.bool, device=device)
    content1 = ElementBatch(g1).valid_masks(shape, device=device)
    content2 = ElementBatch(g2).valid_masks(shape, device=device)
    moved = ElementBatch(relative).apply_map(content1[:, None].float())[:, 0]
    return (moved > 1.0 - 1e-3) & content2


# ---------------------------------------------------------------------------------
# the batch partition
# ---------------------------------------------------------------------------------
@dataclass
class ViewBatch:
    """Two views of a batch and the geometric elements of its equivariant part.

    Attributes:
        views: two tensors ``(B, C, H, W)``.
        eq_index: ``(M,)`` long, the images that used T_eq (the first M).
        g1, g2: ``M`` geometric elements of view 1 / view 2 of those images.
        relative: ``M`` elements ``g = g2 ∘ g1⁻¹`` (``g(view1) ≈ view2``).
        eq_views: with T_eq's ``canvas="resize"``, two lists of ``M`` views ``(C, H_i,
            W_i)`` of the equivariant images (sizes differ); ``views`` then hold only the
            ``B - M`` base images.  ``None``: every view is in ``views``.
        local_views: multi-crop's small views, each ``(B, C, h, w)`` with every image in
            batch order (the T_eq images first, as in the global views); for the base
            SSL loss only (empty: two views).
    """

    views: list[Tensor]
    eq_index: Tensor
    g1: list[Transform] = field(default_factory=list)
    g2: list[Transform] = field(default_factory=list)
    relative: list[Transform] = field(default_factory=list)
    eq_views: list[list[Tensor]] | None = None
    local_views: list[Tensor] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """``B``, the number of images (equivariant ones included)."""
        extra = 0 if self.eq_views is None else len(self.eq_views[0])
        return self.views[0].shape[0] + extra

    def valid_masks(self, shape: tuple[int, int],
                    device: torch.device | str | None = None) -> Tensor:
        """``(M, h, w)`` bool: positions of ``g·map(view 1)`` usable as SER anchors and
        positives on token maps of spatial ``shape`` (see :func:`pair_valid_masks`)."""
        return pair_valid_masks(self.g1, self.g2, self.relative, shape, device)

    def to(self, device: torch.device | str) -> ViewBatch:
        """The same batch with its tensors on ``device``."""
        eq = None if self.eq_views is None else [[t.to(device) for t in v]
                                                  for v in self.eq_views]
        return ViewBatch([v.to(device) for v in self.views], self.eq_index.to(device),
                         self.g1, self.g2, self.relative, eq,
                         [v.to(device) for v in self.local_views])


class ViewSampler:
    """Partition a batch between T (first) and T_eq and sample two views of each image.

    ``M = round(ratio · B)`` images (the first M) use T_eq.  When ``ratio > 0`` but
    ``M == 0`` a warning is given once and the batch has no equivariant part (training
    then runs without the SER term).  With ``n_local > 0`` and a ``local`` policy
    (:func:`local_policy`), ``n_local`` local views of every image follow the two global
    ones (drawn after them, so the global views do not depend on ``n_local``).
    """

    def __init__(self, base: BasePolicy, equivariant: EquivariantPolicy | None,
                 ratio: float, local: BasePolicy | None = None, n_local: int = 0) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio r must be in [0, 1], got {ratio}")
        if ratio > 0 and equivariant is None:
            raise ValueError("ratio > 0 needs an EquivariantPolicy")
        if n_local < 0 or (n_local > 0 and local is None):
            raise ValueError(f"n_local must be >= 0 and needs a local policy, got "
                             f"n_local={n_local}, local={local!r}")
        self.base, self.equivariant, self.ratio = base, equivariant, float(ratio)
        self.local, self.n_local = local, int(n_local)
        self._warned = False

    def n_equivariant(self, batch_size: int) -> int:
        """``M = round(ratio · batch_size)``."""
        return int(round(self.ratio * batch_size))

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> ViewBatch:
        """Views of ``images (B, C, H, W)`` in [0, 1]; see :class:`ViewBatch`."""
        check_image(images, "batch of images")
        b = images.shape[0]
        m = self.n_equivariant(b)
        if self.ratio > 0 and m == 0 and not self._warned:
            warnings.warn(
                f"ratio r={self.ratio} gives no equivariant image in a batch of {b} "
                f"(round(r*B) = 0); training runs without the SER term. Use r >= {0.5 / b:.3g} "
                "or a larger batch", stacklevel=2,
            )
            self._warned = True
        views, g1, g2 = [], [], []
        eq_views: list[list[Tensor]] = []
        for v in range(2):
            parts = []
            if m:
                eq, gs = self.equivariant(images[:m], generator)  # type: ignore[misc]
                if isinstance(eq, list):
                    eq_views.append(eq)
                else:
                    parts.append(eq)
                (g1 if v == 0 else g2).extend(gs)
            if m < b or not parts:
                parts.append(self.base(images[m:], generator) if m < b else images[:0])
            views.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        relative = [_clean(b2 @ b1.inverse()) for b1, b2 in zip(g1, g2)]
        local = [self.local(images, generator) for _ in range(self.n_local)] \
            if self.local is not None else []
        return ViewBatch(views, torch.arange(m, device=images.device), g1, g2, relative,
                         eq_views or None, local)
