"""Training-time data augmentations compared by the learned-equivariance paper (section 4.4).

Every augmentation acts on a batch of images ``(B, C, H, W)`` with values in [0, 1] on any
device, draws its randomness from torch's global RNG (so that
:func:`equivision.training.train` resumes exactly: its checkpoints hold the RNG state) and
keeps the shape. Image-only augmentations are callables ``x -> x``; label-changing ones
(CutMix) take and return ``(x, labels)`` and say so with the attribute
``takes_labels = True``, which :func:`~equivision.training.train` looks for.

===============  ===================================================================
spec             augmentation
===============  ===================================================================
``crop[:PAD]``   :class:`RandomCrop`: zero-pad ``PAD`` (4) pixels, crop back at a
                 random offset (a random translation by -PAD..PAD pixels each way)
``flip[:P]``     :class:`HorizontalFlip`: mirror left-right with probability ``P`` (0.5)
``cutmix[:A[:P]]``  :class:`CutMix` (Yun et al. 2019): with probability ``P`` (0.5,
                 the reference CIFAR setting), paste a box of a shuffled batch, area
                 fraction from Beta(A, A) (A = 1); labels mixed by area (soft targets)
``randaugment[:N[:M]]``  :class:`RandAugment` (Cubuk et al. 2020) via kornia: ``N`` (2)
                 operations at magnitude ``M`` (9, of 30) per image
``none``         no augmentation
===============  ===================================================================

``random_crop`` and ``hflip`` are accepted for ``crop`` and ``flip``. :func:`build_augment`
parses a comma-separated spec such as ``"crop,flip"`` or ``"crop,flip,cutmix"`` and chains
the augmentations in the order given (an :class:`AugmentPipeline`); the names are looked up
in :data:`AUGMENTATIONS`, a :class:`~equivision.registry.Registry`.

The geometric randomness is per image: :class:`RandomCrop` and :class:`HorizontalFlip`
draw one :class:`~equivision.transforms.Translation` / :class:`~equivision.transforms.Dihedral`
element per image (their ``elements`` method) and act through an
:class:`~equivision.transforms.elements.ElementBatch`, which keeps the work batched.

The augmentation functions are named ``random_*`` so that they do not clash with the
fixed transformations of :mod:`equivision.transforms` (``transforms.hflip()`` is the
mirror element; ``augment.random_hflip(x)`` mirrors each image with probability ``p``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry, UnknownNameError, suggest
from .transforms import Dihedral, Translation
from .transforms.elements import ElementBatch

__all__ = [
    "RandomCrop",
    "HorizontalFlip",
    "CutMix",
    "RandAugment",
    "Identity",
    "AugmentPipeline",
    "random_crop",
    "random_hflip",
    "cutmix",
    "randaugment",
    "none",
    "build_augment",
    "AugmentEntry",
    "AUGMENTATIONS",
]


def _check_images(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"{what} expects a float image batch (B, C, H, W), got "
            f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
        )


def _check_prob(what: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{what}: probability must be in [0, 1], got {p!r}")
    return float(p)


# ----------------------------------------------------------------------------- image only


class RandomCrop:
    """Zero-pad ``padding`` pixels on every side, then crop back to (H, W) at a random
    offset drawn per image: a random translation by -padding..padding pixels in x and y
    with zero fill (``torchvision.transforms.RandomCrop(size, padding)``, the standard
    CIFAR augmentation).

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    takes_labels = False

    def __init__(self, padding: int = 4) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"crop: padding must be an integer >= 0, got {padding!r}")
        self.padding = padding

    def offsets(self, batch: int) -> tuple[Tensor, Tensor]:
        """Random crop offsets (top, left), each (batch,) int64 in [0, 2 * padding]."""
        top = torch.randint(0, 2 * self.padding + 1, (batch,))
        left = torch.randint(0, 2 * self.padding + 1, (batch,))
        return top, left

    def elements(self, batch: int) -> ElementBatch:
        """``batch`` random crops as translations: the crop at offset ``(top, left)`` of
        the padded image is ``Translation(padding - left, padding - top)`` with zero fill."""
        top, left = self.offsets(batch)
        p = self.padding
        return ElementBatch(Translation(p - c, p - r) for r, c in zip(top.tolist(), left.tolist()))

    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        _check_images(x, "crop")
        if self.padding == 0:
            return x
        return self.elements(x.shape[0]).apply_image(x).contiguous()

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class HorizontalFlip:
    """Mirror each image left-right with probability ``p`` (drawn per image).

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    takes_labels = False

    def __init__(self, p: float = 0.5) -> None:
        self.p = _check_prob("flip", p)

    def elements(self, batch: int) -> ElementBatch:
        """``batch`` random elements: ``Dihedral(0, flip=True)`` (the mirror) with
        probability ``p``, else the identity."""
        flips = (torch.rand(batch) < self.p).tolist()
        return ElementBatch(Dihedral(0, f) for f in flips)

    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        _check_images(x, "flip")
        return self.elements(x.shape[0]).apply_image(x)

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"


class RandAugment:
    """RandAugment (Cubuk et al. 2020) with kornia's operations and default policy.

    Each image gets its own ``n`` distinct operations, drawn uniformly from the 15 of
    ``kornia.augmentation.auto.RandAugment``'s default policy (auto-contrast, equalize,
    invert, rotate, posterize, solarize, solarize-add, color, contrast, brightness,
    sharpness, shear x/y, translate x/y) and applied in the order drawn at magnitude ``m``
    (0 < m < 30; kornia's scale, see its documentation). kornia's own ``RandAugment`` draws
    one set of operations per batch; here the batch is split by operation so that the choice
    is per image, as in the paper.

    Channels: 3-channel and 1-channel images. kornia's ``color`` (saturation) operation
    requires 3 channels; on a grayscale image saturation has no effect (a gray RGB image
    stays gray), so for 1-channel images ``color`` is the identity and every other operation
    acts on the single channel directly. Other channel counts raise ``ValueError``.
    Inputs should lie in [0, 1].

    Shapes: (B, C, H, W) -> (B, C, H, W), C in {1, 3}.
    """

    takes_labels = False

    def __init__(self, n: int = 2, m: float = 9) -> None:
        from kornia.augmentation.auto import RandAugment as KRandAugment
        from kornia.augmentation.auto.rand_augment.rand_augment import default_policy

        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(default_policy):
            raise ValueError(
                f"randaugment: n must be an integer in [1, {len(default_policy)}], got {n!r}"
            )
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 30:
            raise ValueError(f"randaugment: m must be a number in (0, 30), got {m!r}")
        self.n, self.m = n, m
        self.names = [sub[0][0] for sub in default_policy]
        # one single-operation kornia RandAugment per operation: same magnitude mapping
        self.ops = [KRandAugment(n=1, m=m, policy=[sub]).requires_grad_(False)
                    for sub in default_policy]

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C, H, W)."""
        _check_images(x, "randaugment")
        c = x.shape[1]
        if c not in (1, 3):
            raise ValueError(f"randaugment works on 1- or 3-channel images, got {c} channels")
        b = x.shape[0]
        # n distinct operations per image, in random order
        choice = torch.rand(b, len(self.ops)).argsort(dim=1)[:, : self.n].to(x.device)
        out = x
        for step in range(self.n):
            new = out.clone()
            for k, op in enumerate(self.ops):
                idx = (choice[:, step] == k).nonzero().flatten()
                if idx.numel() == 0 or (c == 1 and self.names[k] == "color"):
                    continue
                new[idx] = op(out[idx]).to(out.dtype)
            out = new
        return out

    def __repr__(self) -> str:
        return f"RandAugment(n={self.n}, m={self.m})"


class Identity:
    """No augmentation: returns the batch unchanged."""

    takes_labels = False

    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> the same tensor."""
        return x

    def __repr__(self) -> str:
        return "Identity()"


# ----------------------------------------------------------------------------- with labels


def _one_hot(y: Tensor, num_classes: int | None) -> Tensor:
    k = int(y.max()) + 1 if num_classes is None else num_classes
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"labels range over [{int(y.min())}, {int(y.max())}], not [0, {k})")
    return F.one_hot(y.long(), k).float()


def cutmix_box(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """Yun et al.'s box: side fractions ``sqrt(1 - lam)``, centre uniform over the image,
    clipped at the border (so the box may be smaller). Uses torch's RNG.

    Returns:
        ``(top, bottom, left, right)``: the box is ``[top:bottom, left:right]``.
    """
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy = int(torch.randint(0, h, ()).item())
    cx = int(torch.randint(0, w, ()).item())
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return top, bottom, left, right


class CutMix:
    """CutMix (Yun et al. 2019), as in their reference implementation.

    With probability ``p`` per batch: draw ``lam ~ Beta(alpha, alpha)``, a random
    permutation ``perm`` of the batch and a box (:func:`cutmix_box`, one box for the whole
    batch); paste ``x[perm]`` into the box of every image, and give image i the soft target
    ``lam' * onehot(y_i) + (1 - lam') * onehot(y_perm[i])`` where ``1 - lam'`` is the box's
    actual area fraction (after clipping). Otherwise the images are returned as they are,
    with one-hot targets.

    ``num_classes`` fixes the width K of the targets; None uses ``labels.max() + 1``, which
    is enough for :func:`~equivision.training.train` (it pads soft targets with zero columns up
    to the model's number of outputs), but give it for a fixed width.

    Shapes: images (B, C, H, W), labels (B,) int -> images (B, C, H, W), targets (B, K)
    float whose rows sum to 1.
    """

    takes_labels = True

    def __init__(self, alpha: float = 1.0, p: float = 0.5, num_classes: int | None = None):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ValueError(f"cutmix: alpha must be a number > 0, got {alpha!r}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"cutmix: num_classes must be None or an integer >= 1, "
                             f"got {num_classes!r}")
        self.alpha = float(alpha)
        self.p = _check_prob("cutmix", p)
        self.num_classes = num_classes

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W), labels (B,) int or soft (B, K) -> images, targets (B, K)."""
        _check_images(x, "cutmix")
        target = y.float() if y.is_floating_point() else _one_hot(y, self.num_classes)
        if target.dim() != 2 or target.shape[0] != x.shape[0]:
            raise ValueError(
                f"cutmix: labels must be (B,) class indices or (B, K) soft targets for "
                f"B = {x.shape[0]} images, got {tuple(y.shape)}"
            )
        apply = bool(torch.rand(()) < self.p) if self.p < 1 else True
        if not apply or x.shape[0] < 2:
            return x, target.to(x.device)
        beta = torch.distributions.Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))
        lam = float(beta.sample())
        perm = torch.randperm(x.shape[0]).to(x.device)
        h, w = x.shape[-2:]
        top, bottom, left, right = cutmix_box(h, w, lam)
        area = (bottom - top) * (right - left) / (h * w)
        out = x.clone()
        out[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
        target = target.to(x.device)
        return out, (1.0 - area) * target + area * target[perm]

    def __repr__(self) -> str:
        return f"CutMix(alpha={self.alpha}, p={self.p}, num_classes={self.num_classes})"


class AugmentPipeline:
    """Apply augmentations in order. Takes and returns ``(images, labels)``
    (``takes_labels = True``); image-only augmentations pass the labels through.

    Shapes: images (B, C, H, W), labels (B,) int -> images (B, C, H, W), labels (B,) int
    or, after a label-mixing augmentation, soft targets (B, K) float.
    """

    takes_labels = True

    def __init__(self, augmentations: Sequence[Callable[..., Any]]) -> None:
        self.augmentations = list(augmentations)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(images, labels) -> (images, labels or soft targets)."""
        for aug in self.augmentations:
            if getattr(aug, "takes_labels", False):
                x, y = aug(x, y)
            else:
                x = aug(x)
        return x, y

    def __repr__(self) -> str:
        return f"AugmentPipeline({self.augmentations!r})"


# ----------------------------------------------------------------------------- functions


def random_crop(x: Tensor, padding: int = 4) -> Tensor:
    """Pad ``padding`` pixels with zeros and crop back at random: (B, C, H, W) -> same."""
    return RandomCrop(padding)(x)


def random_hflip(x: Tensor, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability ``p``: (B, C, H, W) -> same."""
    return HorizontalFlip(p)(x)


def cutmix(
    x: Tensor, y: Tensor, num_classes: int | None = None, alpha: float = 1.0, p: float = 1.0
) -> tuple[Tensor, Tensor]:
    """CutMix a batch (see :class:`CutMix`; here ``p`` defaults to 1: always mix).

    Returns images (B, C, H, W) and soft targets (B, K) float.
    """
    return CutMix(alpha, p, num_classes)(x, y)


_RANDAUGMENT_CACHE: dict[tuple[int, float], RandAugment] = {}


def randaugment(x: Tensor, n: int = 2, m: float = 9) -> Tensor:
    """RandAugment ``n`` operations per image at magnitude ``m`` (see :class:`RandAugment`):
    (B, C, H, W) -> same."""
    key = (n, m)
    if key not in _RANDAUGMENT_CACHE:
        _RANDAUGMENT_CACHE[key] = RandAugment(n, m)
    return _RANDAUGMENT_CACHE[key](x)


def none(x: Tensor) -> Tensor:
    """No augmentation: returns ``x``."""
    return x


# ----------------------------------------------------------------------------- spec parsing


def _num(name: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(
            f"augmentation {name!r}: bad argument {text!r} (expected {kind.__name__})"
        ) from None


def _make_crop(args: list[str], num_classes: int | None) -> RandomCrop:
    return RandomCrop(*[_num("crop", a, int) for a in args])


def _make_flip(args: list[str], num_classes: int | None) -> HorizontalFlip:
    return HorizontalFlip(*[_num("flip", a, float) for a in args])


def _make_cutmix(args: list[str], num_classes: int | None) -> CutMix:
    vals = [_num("cutmix", a, float) for a in args]
    return CutMix(*vals, num_classes=num_classes)


def _make_randaugment(args: list[str], num_classes: int | None) -> RandAugment:
    n = _num("randaugment", args[0], int) if args else 2
    m = _num("randaugment", args[1], float) if len(args) > 1 else 9
    return RandAugment(n, m)


def _make_none(args: list[str], num_classes: int | None) -> Identity:
    return Identity()


class AugmentEntry(NamedTuple):
    """A registered augmentation: ``build(args, num_classes)`` makes it from the
    ``:``-separated arguments of its spec item (at most ``max_args``); ``usage`` is the
    item's grammar, e.g. ``"crop[:PAD]"``."""

    build: Callable[[list[str], int | None], Any]
    max_args: int
    usage: str


#: the augmentations of :func:`build_augment`, by spec name
AUGMENTATIONS: Registry[AugmentEntry] = Registry("augmentation", normalize=str.lower)
for _name, _entry in (
    ("crop", AugmentEntry(_make_crop, 1, "crop[:PAD]")),
    ("flip", AugmentEntry(_make_flip, 1, "flip[:P]")),
    ("cutmix", AugmentEntry(_make_cutmix, 2, "cutmix[:ALPHA[:P]]")),
    ("randaugment", AugmentEntry(_make_randaugment, 2, "randaugment[:N[:M]]")),
    ("none", AugmentEntry(_make_none, 0, "none")),
):
    AUGMENTATIONS.add(_name, _entry, description=_entry.usage)
_ALIASES = {"random_crop": "crop", "hflip": "flip", "rand_augment": "randaugment"}


def _lookup(item: str, spec: str) -> tuple[str, AugmentEntry, list[str]]:
    """``(name, entry, args)`` of one spec item such as ``"crop:4"``.

    Raises:
        UnknownNameError: an unknown name, with did-you-mean suggestions and the grammar.
        ValueError: too many arguments.
    """
    name, *args = (part.strip() for part in item.split(":"))
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in AUGMENTATIONS:
        valid = ", ".join(e.usage for e in map(AUGMENTATIONS.get, AUGMENTATIONS))
        raise UnknownNameError(
            f"unknown augmentation {item!r} in {spec!r}."
            f"{suggest(name, AUGMENTATIONS.list() + list(_ALIASES))} valid: {valid}")
    entry = AUGMENTATIONS.get(name)
    if len(args) > entry.max_args:
        raise ValueError(
            f"augmentation {item!r} takes at most {entry.max_args} argument(s): {entry.usage}")
    return name, entry, args


def build_augment(spec: str | None, num_classes: int | None = None) -> AugmentPipeline:
    """Parse an augmentation spec and chain the augmentations in the order given.

    Args:
        spec: comma-separated names with optional ``:``-separated arguments, e.g.
            ``"crop,flip"``, ``"crop:4,flip:0.5,cutmix:1.0:0.5"``, ``"randaugment:2:9"``;
            ``"none"``, ``""`` or None for no augmentation. Names: ``crop`` (alias
            ``random_crop``), ``flip`` (``hflip``), ``cutmix``, ``randaugment``, ``none``.
        num_classes: width of CutMix's soft targets (None: inferred per batch).

    Returns:
        An :class:`AugmentPipeline` taking and returning ``(images, labels)``, ready for
        ``train(..., augment=...)``.

    Raises:
        ValueError: an unknown name (:class:`~equivision.registry.UnknownNameError`: the
            message suggests close names and lists the valid ones), a repeated name, bad
            arguments, or ``none`` combined with others.
    """
    if spec is None:
        return AugmentPipeline([])
    if not isinstance(spec, str):
        raise ValueError(f"augmentation spec must be a string, got {type(spec).__name__}")
    if not spec.strip():
        return AugmentPipeline([])
    names: list[str] = []
    augs = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ValueError(f"empty item in augmentation spec {spec!r}")
        name, entry, args = _lookup(item, spec)
        if name in names:
            raise ValueError(f"augmentation {name!r} appears twice in {spec!r}")
        names.append(name)
        augs.append(entry.build(args, num_classes))
    if "none" in names and len(names) > 1:
        raise ValueError(f"'none' cannot be combined with other augmentations: {spec!r}")
    return AugmentPipeline([a for a in augs if not isinstance(a, Identity)])
