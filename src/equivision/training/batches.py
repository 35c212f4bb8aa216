"""Checks and pieces of one supervised training batch: unpacking ``(images, labels)``,
checking the model's logits, label-aware augmentation, the cross-entropy loss."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sized
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .config import TrainConfig, TrainError

try:  # numpy is a dependency, but keep training usable without it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["seed_worker", "unpack_batch", "check_outputs", "apply_augment", "batch_loss",
           "soft_targets", "num_items"]


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and NumPy in a data loader worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    if np is not None:
        np.random.seed(seed)


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """A loader batch -> images ``(N, C, H, W)`` float and labels ``(N,)`` or label maps
    ``(N, H, W)`` as int64; anything else raises :class:`TrainError`."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TrainError(
            "the dataset must yield (image, label) pairs; got "
            f"{type(batch).__name__} batches from the data loader"
        )
    x, y = batch[0], batch[1]
    if not isinstance(x, Tensor) or not torch.is_floating_point(x) or x.dim() < 2:
        raise TrainError(
            "images must be float tensors (C, H, W); the data loader produced "
            f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        )
    if (not isinstance(y, Tensor) or y.dim() not in (1, 3) or y.dtype.is_floating_point
            or y.is_complex() or y.dtype == torch.bool):
        raise TrainError(
            "labels must be integer class indices: one int per image (N,) or one per pixel "
            "(N, H, W) for segmentation; the data loader produced "
            f"{type(y).__name__} {getattr(y, 'dtype', '')} {tuple(getattr(y, 'shape', ()))}"
        )
    return x, y.long()


def check_outputs(out: Any, y: Tensor, ignore_index: int = 255) -> None:
    """Logits ``(N, K)`` for labels ``(N,)``, or ``(N, K, H, W)`` for label maps
    ``(N, H, W)`` whose values lie in ``[0, K)`` or equal ``ignore_index``."""
    dense = y.dim() == 3
    if dense:
        ok = isinstance(out, Tensor) and out.dim() == 4 and (
            out.shape[0], *out.shape[2:]) == tuple(y.shape)
        want = f"(N, num_classes, H, W) = ({y.shape[0]}, K, {y.shape[1]}, {y.shape[2]})"
    else:
        ok = isinstance(out, Tensor) and out.dim() == 2 and out.shape[0] == y.shape[0]
        want = f"(N, num_classes) = ({y.shape[0]}, K)"
    if not ok:
        hint = ("; pick the logits with equivision.robust.select_output(model, KEY) "
                "(CLI: --output-key KEY)") if isinstance(out, (Mapping, tuple, list)) else ""
        raise TrainError(
            f"the model must return logits of shape {want} for labels of shape "
            f"{tuple(y.shape)}; got {type(out).__name__} "
            f"{tuple(getattr(out, 'shape', ()))}{hint}"
        )
    valid = y[y != ignore_index] if dense else y
    if valid.numel() == 0:
        return
    lo, hi = int(valid.min()), int(valid.max())
    if lo < 0 or hi >= out.shape[1]:
        extra = f" (besides the ignored {ignore_index})" if dense else ""
        raise TrainError(
            f"labels range over [{lo}, {hi}]{extra} but the model has {out.shape[1]} outputs "
            "(classes)"
        )


def apply_augment(augment: Callable[..., Any], x: Tensor, y: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """Run ``augment`` on a training batch; returns images and targets: labels (N,) int or
    soft targets (N, K') float from a label-aware augmentation (``takes_labels = True``), or
    label maps (N, H, W) from a mask-aware one (``takes_masks = True``)."""
    if y.dim() == 3:
        if not getattr(augment, "takes_masks", False):
            raise TrainError(
                f"the augmentation {getattr(augment, '__name__', type(augment).__name__)} would "
                "change the images but not their label maps (N, H, W): give it an attribute "
                "takes_masks = True and have augment(x, masks) return (x, masks) transformed "
                "alike, or train segmentation without augment"
            )
        result = augment(x, y)
        if (not isinstance(result, (tuple, list)) or len(result) != 2
                or not isinstance(result[1], Tensor) or result[1].shape != y.shape
                or result[1].is_floating_point()):
            raise TrainError(
                "an augmentation with takes_masks = True must return (images, masks) with "
                f"integer masks of shape {tuple(y.shape)}"
            )
        return result[0], result[1]
    if not getattr(augment, "takes_labels", False):
        return augment(x), y
    result = augment(x, y)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TrainError(
            "an augmentation with takes_labels = True must return (images, labels); got "
            f"{type(result).__name__}"
        )
    x, t = result
    if not isinstance(t, Tensor) or t.shape[:1] != y.shape or t.dim() not in (1, 2):
        raise TrainError(
            f"the augmentation returned labels of shape {tuple(getattr(t, 'shape', ()))} for "
            f"{y.shape[0]} images; expected ({y.shape[0]},) class indices or "
            f"({y.shape[0]}, K) soft targets"
        )
    if t.dim() == 1 and t.is_floating_point():
        raise TrainError("the augmentation returned float labels of shape (N,); expected "
                         "integer class indices or (N, K) soft targets")
    return x, t


def batch_loss(out: Tensor, target: Tensor, config: TrainConfig
               ) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of a batch and the mask of the items (pixels) it counts.

    Classification: ``(N, K)`` with labels ``(N,)`` or soft targets ``(N, K)``. Segmentation:
    ``(N, K, H, W)`` with maps ``(N, H, W)``, the mean taken over the pixels not equal to
    ``config.ignore_index`` (a batch without such pixels has loss 0).
    """
    if out.dim() == 4:
        valid = target != config.ignore_index
        loss = F.cross_entropy(out.float(), target, ignore_index=config.ignore_index,
                               label_smoothing=config.label_smoothing, reduction="sum")
        return loss / valid.sum().clamp_min(1), valid
    loss = F.cross_entropy(out.float(), target, label_smoothing=config.label_smoothing)
    return loss, torch.ones(out.shape[0], dtype=torch.bool, device=out.device)


def soft_targets(t: Tensor, num_classes: int) -> Tensor:
    """Soft targets (N, K') -> (N, num_classes) float, padded with zero columns when
    K' < num_classes (class probabilities beyond K' are 0)."""
    if t.shape[1] > num_classes:
        raise TrainError(
            f"the augmentation returned soft targets over {t.shape[1]} classes but the model "
            f"has {num_classes} outputs"
        )
    t = t.float()
    if t.shape[1] < num_classes:
        t = F.pad(t, (0, num_classes - t.shape[1]))
    return t


def num_items(dataset: Dataset, what: str) -> int:
    """``len(dataset)``; ``TypeError`` without one, ``ValueError`` when it is 0."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"the {what} set must be a map-style dataset with len()")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"the {what} set is empty")
    return n
