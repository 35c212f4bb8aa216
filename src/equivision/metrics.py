"""Task metrics shared by training, attacks and evaluation: accuracy, mIoU, task loss.

Two kinds of outputs are supported everywhere:

* classification: logits ``(B, K)`` with labels ``(B,)``;
* segmentation: logits ``(B, K, H, W)`` with labels ``(B, H, W)``; pixels whose label
  equals ``ignore_index`` (default 255) count neither in the loss nor in any metric.

mIoU follows the usual convention: a class that occurs neither in the prediction nor in
the target (over the valid pixels considered) is left out of the mean.

:class:`ConfusionMeter` accumulates a confusion matrix over batches; its single int64
``confusion`` tensor can be summed across processes (``torch.distributed.all_reduce``)
before reading :meth:`ConfusionMeter.miou` or :meth:`ConfusionMeter.accuracy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "ConfusionMeter",
    "accuracy",
    "check_output_labels",
    "confusion_matrix",
    "is_segmentation",
    "miou",
    "miou_from_confusion",
    "per_image_miou",
    "per_image_score",
    "pixel_accuracy",
    "task_loss",
]

#: Default label of pixels that are left out of losses and metrics.
IGNORE_INDEX = 255


def is_segmentation(output: Tensor) -> bool:
    """True for dense outputs ``(B, K, H, W)``, False for logits ``(B, K)``.

    Raises:
        ValueError: any other number of dimensions.
    """
    if output.dim() == 4:
        return True
    if output.dim() == 2:
        return False
    raise ValueError(
        "model outputs must be logits (B, K) for classification or (B, K, H, W) for "
        f"segmentation, got shape {tuple(output.shape)}"
    )


def check_output_labels(output: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> None:
    """Check that ``labels`` fit ``output``; raise a ``ValueError`` saying what is wrong.

    Classification needs labels ``(B,)`` in ``[0, K)``; segmentation labels ``(B, H, W)``
    in ``[0, K)`` or equal to ``ignore_index``. Labels must be an integer tensor.
    """
    seg = is_segmentation(output)
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor, got {type(labels).__name__} "
            f"{getattr(labels, 'dtype', '')}"
        )
    want = (output.shape[0], *output.shape[2:]) if seg else (output.shape[0],)
    if tuple(labels.shape) != want:
        kind = "segmentation (B, H, W)" if seg else "classification (B,)"
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match the model output of shape "
            f"{tuple(output.shape)}: {kind} labels of shape {want} are needed"
        )
    k = output.shape[1]
    valid = labels != ignore_index if seg else torch.ones_like(labels, dtype=torch.bool)
    bad = valid & ((labels < 0) | (labels >= k))
    if bool(bad.any()):
        extra = f" or {ignore_index} (ignored)" if seg else ""
        raise ValueError(
            f"labels must lie in [0, {k}){extra} for a model with {k} outputs; got "
            f"{labels[bad].unique()[:8].tolist()}"
        )


def task_loss(output: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-image cross-entropy ``(B,)`` (float32).

    Classification: the cross-entropy of each image. Segmentation: the mean per-pixel
    cross-entropy over each image's valid pixels (0 for an image without valid pixels);
    ignored pixels contribute neither value nor gradient.
    """
    if not is_segmentation(output):
        return F.cross_entropy(output.float(), labels, reduction="none")
    per_pixel = F.cross_entropy(output.float(), labels, ignore_index=ignore_index,
                                reduction="none")
    count = (labels != ignore_index).flatten(1).sum(1).clamp_min(1)
    return per_pixel.flatten(1).sum(1) / count


def accuracy(output: Tensor, labels: Tensor) -> float:
    """Fraction of images whose argmax class equals the label: logits ``(B, K)``, ``(B,)``."""
    if is_segmentation(output):
        raise ValueError("accuracy() is for classification logits (B, K); use "
                         "pixel_accuracy() or miou() for segmentation outputs")
    return float((output.argmax(1) == labels).float().mean())


def pixel_accuracy(pred: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of valid pixels predicted right; ``pred`` and ``target`` are ``(B, H, W)``
    class maps (pass ``output.argmax(1)``). NaN when no pixel is valid."""
    valid = target != ignore_index
    n = int(valid.sum())
    return float("nan") if n == 0 else float(((pred == target) & valid).sum()) / n


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Confusion matrix ``(K, K)`` int64, rows = target class, columns = predicted class.

    ``pred`` and ``target`` are integer tensors of the same shape (any shape: ``(B,)`` for
    classification, ``(B, H, W)`` for segmentation). Targets equal to ``ignore_index`` are
    skipped.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have "
                         "the same shape")
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes
                      or int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes})")
    idx = t * num_classes + p
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _iou(conf: Tensor) -> tuple[Tensor, Tensor]:
    """IoU per class ``(..., K)`` and a mask of the classes present (union > 0)."""
    tp = conf.diagonal(dim1=-2, dim2=-1).double()
    union = conf.sum(-1).double() + conf.sum(-2).double() - tp
    present = union > 0
    return torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp)), present


def miou_from_confusion(conf: Tensor) -> float:
    """mIoU of a confusion matrix ``(K, K)``; classes absent from prediction and target are
    left out. NaN for an empty matrix."""
    iou, present = _iou(conf)
    n = int(present.sum())
    return float("nan") if n == 0 else float(iou[present].sum()) / n


def miou(pred: Tensor, target: Tensor, num_classes: int,
         ignore_index: int = IGNORE_INDEX) -> float:
    """Dataset mIoU of class maps ``pred``, ``target`` ``(B, H, W)`` (one confusion matrix
    over all their pixels)."""
    return miou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def per_image_miou(pred: Tensor, target: Tensor, num_classes: int,
                   ignore_index: int = IGNORE_INDEX) -> Tensor:
    """mIoU of each image ``(B,)`` float64 from class maps ``(B, H, W)``; NaN for an image
    without valid pixels."""
    if pred.shape != target.shape or pred.dim() < 2:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be "
                         "class maps of the same shape (B, H, W)")
    b, k = pred.shape[0], num_classes
    valid = (target != ignore_index).flatten(1)
    t = torch.where(valid, target.flatten(1).long(), torch.zeros_like(valid, dtype=torch.long))
    idx = (torch.arange(b, device=pred.device)[:, None] * k + t) * k + pred.flatten(1).long()
    conf = torch.bincount(idx[valid], minlength=b * k * k).view(b, k, k)
    iou, present = _iou(conf)
    n = present.sum(1)
    out = iou.sum(1) / n.clamp_min(1)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def per_image_score(output: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                    targeted: bool = False) -> Tensor:
    """The per-image quantity an attack drives down, ``(B,)`` float64, lower = worse for the
    model.

    Untargeted: classification correctness (1 or 0) or segmentation per-image mIoU (an image
    without valid pixels scores 1: nothing to attack). Targeted (``labels`` = targets):
    classification 0 where the prediction is the target, else 1; segmentation
    1 - (fraction of the image's valid pixels predicted as their target).
    """
    pred = output.argmax(1)
    if not is_segmentation(output):
        return (pred != labels).double() if targeted else (pred == labels).double()
    if targeted:
        valid = labels != ignore_index
        hit = ((pred == labels) & valid).flatten(1).sum(1).double()
        return 1.0 - hit / valid.flatten(1).sum(1).clamp_min(1).double()
    return per_image_miou(pred, labels, output.shape[1], ignore_index).nan_to_num(1.0)


class ConfusionMeter:
    """Streaming confusion matrix over batches, for classification or segmentation.

    ``update(output, labels)`` takes logits ``(B, K)`` / ``(B, K, H, W)`` (or class maps of
    the labels' shape) with their labels. The state is the single int64 tensor
    :attr:`confusion` ``(K, K)``: sum it across processes (``all_reduce``) or merge meters
    with ``+=`` before reading the metrics.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 device: str | torch.device = "cpu") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, output: Tensor, labels: Tensor) -> None:
        """Add a batch: logits ``(B, K[, H, W])`` or predicted classes shaped like ``labels``."""
        pred = output if output.shape == labels.shape else output.argmax(1)
        conf = confusion_matrix(pred.detach(), labels, self.num_classes, self.ignore_index)
        self.confusion += conf.to(self.confusion.device)

    def __iadd__(self, other: ConfusionMeter) -> ConfusionMeter:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge meters over {other.num_classes} and "
                             f"{self.num_classes} classes")
        self.confusion += other.confusion.to(self.confusion.device)
        return self

    def reset(self) -> None:
        """Zero the counts."""
        self.confusion.zero_()

    @property
    def total(self) -> int:
        """Number of (valid) items or pixels counted."""
        return int(self.confusion.sum())

    def accuracy(self) -> float:
        """Fraction of correct items (pixels); NaN when nothing was counted."""
        n = self.total
        return float("nan") if n == 0 else float(self.confusion.diagonal().sum()) / n

    def iou(self) -> Tensor:
        """IoU per class ``(K,)`` float64; NaN for classes absent from prediction and target."""
        iou, present = _iou(self.confusion)
        return torch.where(present, iou, torch.full_like(iou, float("nan")))

    def miou(self) -> float:
        """mIoU over the classes present in prediction or target."""
        return miou_from_confusion(self.confusion)
