"""Views (transformations) that a model can take: its minimum input size, found by trying.

A model with a fixed stack of strided layers (``cnn7`` at 28 px) rejects images smaller
than some size, so the paper's 0.3x and 0.6x resizes can fail. These helpers

* :func:`min_input_size`: the smallest square side the model runs on (binary search over
  forward passes of one zero image; assumes that a model taking ``s`` px takes more);
* :func:`check_views`: one clear error naming the first view the model cannot take and
  the model's minimum size;
* :func:`fitting_views`: the views of a list that the model takes; a shrinking resize it
  cannot take is replaced by the resize to the model's minimum size when that still
  shrinks the image (dropped otherwise), other views it cannot take are dropped.

:func:`parse_views` reads the defense's views from a spec string: the transformation
grammar (:func:`~equivision.transforms.as_transforms`) plus ``resize:F``
(:class:`~equivision.transforms.Resize` by ``F``), which that grammar does not have.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..transforms import Resize, Transform, as_transforms

__all__ = ["check_views", "fitting_views", "min_input_size", "parse_views", "takes"]


def parse_views(spec: str | Transform | Sequence[str | Transform]) -> list[Transform]:
    """Views from a spec such as ``"resize:0.5,resize:2,hflip,rotate:15"``: ``resize:F``
    entries become :class:`~equivision.transforms.Resize` ``(F)``, the others are read by
    :func:`~equivision.transforms.as_transforms` (in order); Transforms pass as they are.

    Raises:
        ValueError: an empty spec, a bad ``resize`` factor or a bad entry (as
            ``as_transforms`` says).
        TypeError: something that is neither a string nor a Transform.
    """
    if not isinstance(spec, str):
        if isinstance(spec, Transform) or not isinstance(spec, Sequence):
            return as_transforms(spec)  # a Transform, or a TypeError that says what is wrong
        return [g for item in spec for g in (parse_views(item) if isinstance(item, str)
                                             else as_transforms(item))]
    out: list[Transform] = []
    chunk: list[str] = []
    for token in [t for t in re.split(r"[\s,]+", spec.strip()) if t] + [""]:
        if token and not token.lower().startswith("resize:"):
            chunk.append(token)
            continue
        if chunk:
            out += as_transforms(",".join(chunk))
            chunk = []
        if token:
            try:
                out.append(Resize(float(token.partition(":")[2])))
            except ValueError:
                raise ValueError(f"bad view {token!r}: resize takes a factor > 0, e.g. "
                                 "resize:0.5") from None
    if not out:
        raise ValueError(f"no view given in {spec!r}; e.g. 'resize:2,hflip,rotate:15'")
    return out


@torch.no_grad()
def takes(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model`` runs on ``x (1, C, h, w)`` without raising and returns finite
    numbers."""
    try:
        out = model(x)
    except (RuntimeError, ValueError, IndexError, AssertionError):
        return False
    t = out if isinstance(out, Tensor) else None
    return t is None or bool(torch.isfinite(t).all())


def min_input_size(model: nn.Module, image: Tensor) -> int:
    """Smallest square side ``s <= max(H, W)`` on which ``model`` runs, for images shaped
    like ``image (B, C, H, W)``; ``max(H, W) + 1`` when it takes none."""
    c, hi = image.shape[1], max(image.shape[-2], image.shape[-1])
    probe = image[:1].detach()

    def ok(side: int) -> bool:
        return takes(model, torch.zeros(1, c, side, side, dtype=probe.dtype,
                                        device=probe.device))

    if not ok(hi):
        return hi + 1
    lo = 1
    while lo < hi:  # invariant: hi is taken
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _shrinks(resize: Resize, probe: Tensor) -> bool:
    """Whether ``resize`` makes ``probe (1, C, H, W)`` smaller (after its rounding)."""
    return resize.apply_image(probe).shape[-2] < probe.shape[-2]


def check_views(model: nn.Module, transforms: Sequence[Transform], image: Tensor) -> None:
    """Raise one clear ValueError when ``model`` cannot take a view ``g(image)`` of
    ``image (B, C, H, W)``: it names the view, the size it makes and the model's minimum
    input size."""
    probe = image[:1].detach()
    for g in transforms:
        view = g.apply_image(probe)
        if not takes(model, view):
            size = min_input_size(model, image)
            raise ValueError(
                f"{type(model).__name__} cannot take the view {g!r}: it makes "
                f"{image.shape[-2]}x{image.shape[-1]} images {view.shape[-2]}x"
                f"{view.shape[-1]}; the model's minimum input size is {size} px; choose "
                "views that keep images at least that large (--defense-transforms / "
                "transforms=)")


def fitting_views(model: nn.Module, transforms: Sequence[Transform],
                  image: Tensor) -> list[Transform]:
    """The views of ``transforms`` that ``model`` takes on images like ``image``; see the
    module docstring for the replacements of resizes.

    Raises:
        ValueError: no view fits.
    """
    probe = image[:1].detach()
    out: list[Transform] = []
    size: int | None = None
    for g in transforms:
        if takes(model, g.apply_image(probe)):
            out.append(g)
            continue
        if not isinstance(g, Resize) or g.factor >= 1:
            continue
        size = size if size is not None else min_input_size(model, image)
        factor = size / min(image.shape[-2], image.shape[-1])
        fit = Resize(factor, g.mode, g.antialias, g.multiple) if factor < 1 else None
        if fit is not None and _shrinks(fit, probe) and takes(model, fit.apply_image(probe)) \
                and all(repr(fit) != repr(v) for v in out):
            out.append(fit)
    if not out:
        raise ValueError(f"{type(model).__name__} takes none of the views {list(transforms)} "
                         f"of {tuple(image.shape[1:])} images; pass views it can take")
    return out
