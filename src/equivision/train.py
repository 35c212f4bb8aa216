"""The supervised training loop used across equivision.

:func:`train` trains a classifier (logits ``(N, K)``, labels ``(N,)``) or a segmenter (dense
logits ``(N, K, H, W)``, label maps ``(N, H, W)`` with ``TrainConfig.ignore_index`` pixels left
out) with cross-entropy, logs every epoch to ``out_dir/log.csv``
and writes an atomic checkpoint ``out_dir/last.pt`` after every epoch. The checkpoint holds
the model, optimizer and scheduler state, the history, the config and every RNG state (torch
CPU/CUDA, Python ``random``, NumPy and the data loader's shuffling generator), so that
``resume=True`` continues an interrupted run exactly: the result is bit-identical to an
uninterrupted run on the same hardware and software.

Example::

    model = create_model("cnn7")
    history = train(model, train_set, val_set, TrainConfig(epochs=30), out_dir="runs/cnn7")
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sized
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import (
    CheckpointError,
    _load_weights,
    check_weights_only_safe,
    load_checkpoint,
    save_checkpoint,
)
from .utils import get_rng_state, preserve_rng_state, resolve_device, seed_everything, set_rng_state

__all__ = ["TrainConfig", "TrainError", "train", "evaluate", "HISTORY_KEYS", "CHECKPOINT_NAME"]

#: Columns of the history dict and of ``log.csv``, in order.
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "time")
#: File name of the per-epoch checkpoint inside ``out_dir``.
CHECKPOINT_NAME = "last.pt"
LOG_NAME = "log.csv"

_OPTIMIZERS = ("sgd", "adam", "adamw")
_SCHEDULES = ("cosine", "constant")
#: Config fields that may change between an interrupted run and its resumption silently.
_RESUME_FREE = ("epochs", "device", "num_workers", "eval_batch_size")
_TRAIN_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "rng", "config")


class TrainError(RuntimeError):
    """Training cannot go on: bad data or model outputs, or a diverging loss."""


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes:
        epochs: total number of epochs (a resumed run trains up to this many).
        batch_size: training batch size.
        lr: peak learning rate.
        momentum: SGD momentum (``sgd`` only).
        weight_decay: L2 penalty (``sgd``, ``adam``) or decoupled weight decay (``adamw``).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        schedule: ``"cosine"`` (per step, down to 0 at the end) or ``"constant"``.
        warmup_epochs: epochs (may be fractional) of linear warmup from ``lr / warmup_steps``.
        seed: seeds all RNGs at the start of a fresh run (seed before building the model
            yourself: model initialisation happens before :func:`train`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``.
        num_workers: data loader worker processes.
        grad_clip: clip the gradient norm to this value (None: no clipping).
        label_smoothing: label smoothing of the training loss, in [0, 1).
        eval_batch_size: batch size of validation (None: ``batch_size``).
        ignore_index: label of pixels left out of the loss and the metrics when the labels
            are maps ``(N, H, W)`` (segmentation); unused for classification.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    schedule: str = "cosine"
    warmup_epochs: float = 0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    eval_batch_size: int | None = None
    ignore_index: int = 255

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("epochs", "batch_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        for name in ("seed", "num_workers"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        if not is_num(self.lr) or self.lr <= 0:
            raise bad("lr", "a number > 0")
        if not is_num(self.momentum) or not 0 <= self.momentum < 1:
            raise bad("momentum", "a number in [0, 1)")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a number >= 0")
        if not is_num(self.warmup_epochs) or not 0 <= self.warmup_epochs <= self.epochs:
            raise bad("warmup_epochs", f"a number in [0, epochs={self.epochs}]")
        if not is_num(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "a number in [0, 1)")
        if self.grad_clip is not None and (not is_num(self.grad_clip) or self.grad_clip <= 0):
            raise bad("grad_clip", "None or a number > 0")
        if self.eval_batch_size is not None and (
            not is_int(self.eval_batch_size) or self.eval_batch_size < 1
        ):
            raise bad("eval_batch_size", "None or an integer >= 1")
        if not is_int(self.ignore_index):
            raise bad("ignore_index", "an integer")
        if self.optimizer not in _OPTIMIZERS:
            raise bad("optimizer", f"one of {', '.join(map(repr, _OPTIMIZERS))}")
        if self.schedule not in _SCHEDULES:
            raise bad("schedule", f"one of {', '.join(map(repr, _SCHEDULES))}")
        if not isinstance(self.device, str):
            raise bad("device", "a string such as 'auto', 'cpu', 'cuda' or 'cuda:1'")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (stored in checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown TrainConfig field(s) {', '.join(unknown)}; valid: {', '.join(names)}"
            )
        return cls(**data)


# ----------------------------------------------------------------------------- helpers


def _seed_worker(worker_id: int) -> None:
    """Seed ``random`` and NumPy in a data loader worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def _unpack(batch: Any) -> tuple[Tensor, Tensor]:
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


def _check_outputs(out: Any, y: Tensor, ignore_index: int = 255) -> None:
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
        raise TrainError(
            f"the model must return logits of shape {want} for labels of shape "
            f"{tuple(y.shape)}; got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
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


def _apply_augment(augment: Callable[..., Any], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
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


def _loss(out: Tensor, target: Tensor, config: TrainConfig) -> tuple[Tensor, Tensor]:
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


def _soft_targets(t: Tensor, num_classes: int) -> Tensor:
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


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _num_items(dataset: Dataset, what: str) -> int:
    if not isinstance(dataset, Sized):
        raise TypeError(f"the {what} set must be a map-style dataset with len()")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"the {what} set is empty")
    return n


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainError(f"{type(model).__name__} has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup, then cosine decay to 0 or a constant rate."""
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    cosine = config.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _write_csv(path: Path, history: dict[str, list[Any]]) -> None:
    """Rewrite ``log.csv`` from the history (atomically, so it always matches a checkpoint)."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HISTORY_KEYS)
            for i in range(len(history["epoch"])):
                row = [history[k][i] for k in HISTORY_KEYS]
                writer.writerow(["" if v is None else v for v in row])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _model_identity(model: nn.Module) -> tuple[str | None, dict[str, Any] | None]:
    name = getattr(model, "equivision_name", None)
    kwargs = getattr(model, "equivision_kwargs", None)
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        return None, None
    try:
        check_weights_only_safe(kwargs, "model_kwargs")
    except TypeError as e:
        warnings.warn(
            f"the checkpoint will not record how to rebuild model {name!r}: {e}", stacklevel=3
        )
        return None, None
    return name, dict(kwargs)


def _check_resume_model(model: nn.Module, ckpt: dict[str, Any], path: Path) -> None:
    name, kwargs = _model_identity(model)
    c_name, c_kwargs = ckpt.get("model_name"), ckpt.get("model_kwargs")
    if name is not None and c_name is not None and (name, kwargs) != (c_name, c_kwargs):
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: it holds model {c_name!r} with arguments "
            f"{c_kwargs}, but the model passed to train() is {name!r} with arguments {kwargs}. "
            "Build the same model to resume, or train into another out_dir"
        )
    c_class = ckpt.get("model_class")
    own_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if isinstance(c_class, str) and c_class != own_class:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: it holds a {c_class}, but the model passed to "
            f"train() is a {own_class}. Build the same model to resume, or train into another "
            "out_dir"
        )


def _check_history(history: Any, path: Path) -> dict[str, list[Any]]:
    if not isinstance(history, dict) or any(
        not isinstance(history.get(k), list) for k in HISTORY_KEYS
    ):
        raise CheckpointError(f"checkpoint file {str(path)!r} has a malformed training history")
    return {k: list(history[k]) for k in HISTORY_KEYS}


def _config_changes(old: Any, new: TrainConfig) -> list[str]:
    if not isinstance(old, dict):
        return []
    changes = []
    for key, value in new.to_dict().items():
        if key in _RESUME_FREE or key not in old:
            continue
        if old[key] != value:
            changes.append(f"{key} ({old[key]!r} -> {value!r})")
    return changes


# ----------------------------------------------------------------------------- public API


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    ignore_index: int = 255,
) -> dict[str, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``dataset``.

    ``dataset`` yields (image (C, H, W) float tensor, int label); the model maps
    (N, C, H, W) -> logits (N, num_classes). For segmentation the dataset yields (image,
    label map (H, W) int) and the model returns logits (N, num_classes, H, W); pixels equal
    to ``ignore_index`` are left out. The model runs in eval mode (its previous mode
    is restored afterwards) on ``device`` (None: where its parameters are; otherwise it is
    moved there). Global RNG states are not consumed.

    Returns:
        ``{"loss": float, "accuracy": float}`` (accuracy in [0, 1]); for segmentation the
        loss is the mean over valid pixels, ``accuracy`` the pixel accuracy, and the dict
        also holds ``"miou"`` (dataset confusion-matrix mIoU; classes absent from both
        prediction and target are left out).
    """
    from .robust.metrics import ConfusionMeter  # shared with the attacks' evaluation

    _num_items(dataset, "evaluation")
    dev = _model_device(model) if device is None else resolve_device(device)
    model.to(dev)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        generator=torch.Generator(),  # keeps the loader from drawing on the global RNG
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen = torch.zeros((), dtype=torch.int64, device=dev)  # images or valid pixels
    meter: ConfusionMeter | None = None
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = _unpack(batch)
                x, y_dev = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                out = model(x)
                _check_outputs(out, y, ignore_index)
                valid = y_dev != ignore_index if y.dim() == 3 else torch.ones_like(
                    y_dev, dtype=torch.bool)
                total += F.cross_entropy(out.float(), y_dev, reduction="sum",
                                         ignore_index=ignore_index if y.dim() == 3 else -100
                                         ).double()
                correct += ((out.argmax(1) == y_dev) & valid).sum()
                seen += valid.sum()
                if y.dim() == 3:
                    if meter is None:
                        meter = ConfusionMeter(out.shape[1], ignore_index, device=dev)
                    meter.update(out, y_dev)
    finally:
        model.train(was_training)
    n = max(1, int(seen))
    result = {"loss": float(total) / n, "accuracy": float(correct) / n}
    if meter is not None:
        result["miou"] = meter.miou()
    return result


def train(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None = None,
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Iterable[Any] = (),
    augment: Callable[..., Any] | None = None,
    progress: bool = True,
) -> dict[str, list[Any]]:
    """Train ``model`` (in place) as a classifier or segmenter with cross-entropy.

    Args:
        model: maps images (N, C, H, W) to logits (N, num_classes), or for segmentation to
            dense logits (N, num_classes, H, W); moved to the device.
        train_set: map-style dataset of (image (C, H, W) float tensor, int label) pairs, or
            (image, label map (H, W) int tensor) pairs for segmentation: the loss is then
            the mean per-pixel cross-entropy over the pixels not equal to
            ``config.ignore_index``, ``train_acc``/``val_acc`` are pixel accuracies and
            :func:`evaluate` also reports the mIoU. An ``augment`` must then be mask-aware
            (``takes_masks = True``, called as ``augment(x, masks) -> (x, masks)``);
            any other augmentation raises :class:`TrainError`.
        val_set: optional dataset of the same kind, evaluated after every epoch.
        config: the settings (default ``TrainConfig()``).
        out_dir: where to write ``log.csv`` and the checkpoint ``last.pt`` after every epoch
            (None: write nothing, no resuming).
        resume: continue from ``out_dir/last.pt`` exactly where it stopped (the model,
            optimizer, scheduler, history and all RNG states are restored; the model passed in
            must be the same architecture). Without a checkpoint there a fresh run starts
            (with a warning). With ``resume=False`` an existing ``out_dir/last.pt`` is never
            overwritten: ``FileExistsError`` is raised instead.
        callbacks: objects with an optional method ``on_epoch_end(epoch, model, history)``,
            called after each epoch's checkpoint is written (``epoch`` counts from 1;
            ``history`` is a copy). They run with the RNG states preserved, so they do not
            change the training's random stream.
        augment: optional function applied to every training batch (N, C, H, W) on the device,
            e.g. random flips; it must keep its randomness on torch's (or Python's / NumPy's
            global) RNGs so that resuming is exact. Not applied to validation. If it has an
            attribute ``takes_labels = True`` (as :func:`equivision.augment.build_augment`'s
            augmentations do) it is called as ``augment(x, y)`` with the labels (N,) and
            returns ``(x, targets)``, where targets are labels (N,) or soft targets (N, K')
            float (CutMix): the loss is then cross-entropy with probability targets (padded
            with zero columns when K' < num_classes, label smoothing applied to them), and
            ``train_acc`` counts predictions equal to the targets' argmax (the class with the
            largest share of the mixed image).
        progress: show tqdm progress bars.

    Returns:
        The history: a dict of equal-length lists keyed by :data:`HISTORY_KEYS` (``epoch``
        from 1, ``lr`` at the epoch's start, ``train_loss``/``train_acc`` averaged over the
        epoch, ``val_loss``/``val_acc`` or None without ``val_set``, ``time`` in seconds).

    Raises:
        FileExistsError: ``out_dir/last.pt`` exists and ``resume`` is False.
        CheckpointError: the checkpoint to resume from is unreadable or holds another model.
        TrainError: bad batches or model outputs, or a non-finite loss.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir of the run to resume")
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    ckpt: dict[str, Any] | None = None
    if ckpt_path is not None and ckpt_path.exists():
        if not resume:
            raise FileExistsError(
                f"{str(ckpt_path)!r} already exists: a run was already trained in "
                f"{str(out_dir)!r}. Pass resume=True to continue it, or choose another out_dir "
                "(or delete the old run) to start a new one"
            )
        ckpt = load_checkpoint(ckpt_path, required_keys=_TRAIN_KEYS)
    elif resume:
        warnings.warn(
            f"resume=True but there is no checkpoint {str(ckpt_path)!r}; starting a fresh run",
            stacklevel=2,
        )
    n_train = _num_items(train_set, "training")
    if val_set is not None:
        _num_items(val_set, "validation")
    callbacks = list(callbacks)
    device = resolve_device(config.device)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    model_name, model_kwargs = _model_identity(model)

    if ckpt is None:
        seed_everything(config.seed)
    model.to(device)
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)
    generator = torch.Generator()
    generator.manual_seed(config.seed)
    history: dict[str, list[Any]] = {k: [] for k in HISTORY_KEYS}
    start = 0

    if ckpt is not None:
        assert ckpt_path is not None
        where = f"checkpoint file {str(ckpt_path)!r}"
        _check_resume_model(model, ckpt, ckpt_path)
        _load_weights(model, ckpt, where)
        old_config = ckpt["config"]
        if isinstance(old_config, dict) and old_config.get("optimizer") != config.optimizer:
            raise CheckpointError(
                f"cannot resume from {str(ckpt_path)!r}: it was trained with optimizer "
                f"{old_config.get('optimizer')!r}, but the config asks for {config.optimizer!r}"
            )
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"{where}: its optimizer/scheduler state does not fit this model and config: {e}"
            ) from e
        history = _check_history(ckpt["history"], ckpt_path)
        start = ckpt["epoch"]
        if not isinstance(start, int) or start != len(history["epoch"]):
            raise CheckpointError(f"{where}: its epoch counter {start!r} does not match its log")
        rng = ckpt["rng"]
        try:
            set_rng_state(rng)
            generator.set_state(rng["loader"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{where}: its RNG state is malformed: {e}") from e
        changes = _config_changes(old_config, config)
        if ckpt.get("steps_per_epoch") != steps_per_epoch:
            changes.append(
                f"steps per epoch ({ckpt.get('steps_per_epoch')} -> {steps_per_epoch}; "
                "did the training set change?)"
            )
        if changes:
            warnings.warn(
                f"resuming {str(ckpt_path)!r} with settings that differ from the checkpoint's: "
                f"{', '.join(changes)}; the optimizer and scheduler state come from the "
                "checkpoint, so the run will not match an uninterrupted one",
                stacklevel=2,
            )
        if start >= config.epochs:
            warnings.warn(
                f"{str(ckpt_path)!r} has already trained {start} of {config.epochs} epochs; "
                "nothing to do",
                stacklevel=2,
            )

    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_seed_worker if config.num_workers > 0 else None,
    )
    eval_batch = config.eval_batch_size or config.batch_size
    epoch_bar = tqdm(
        range(start, config.epochs),
        initial=start,
        total=config.epochs,
        desc="epochs",
        disable=not progress,
    )
    for index in epoch_bar:
        epoch = index + 1
        t0 = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        counted = torch.zeros((), dtype=torch.int64, device=device)  # images or valid pixels
        seen = 0
        bar = tqdm(
            loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not progress
        )
        for step, batch in enumerate(bar):
            x, y = _unpack(batch)
            x, y_dev = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            target = y_dev
            if augment is not None:
                x, target = _apply_augment(augment, x, y_dev)
            out = model(x)
            _check_outputs(out, y, config.ignore_index)
            if target.dim() == 2:  # soft targets from a label-mixing augmentation
                target = _soft_targets(target, out.shape[1])
                hard = target.argmax(1)
            else:
                if target is not y_dev:
                    _check_outputs(out, target, config.ignore_index)
                target = hard = target.long()
            loss, valid = _loss(out, target, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            total += loss.detach().double() * y.shape[0]
            correct += ((out.detach().argmax(1) == hard) & valid).sum()
            counted += valid.sum()
            seen += y.shape[0]
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{float(total) / seen:.4f}")
        train_loss = float(total) / seen
        if not math.isfinite(train_loss):
            raise TrainError(
                f"the training loss became {train_loss} in epoch {epoch}; lower the learning "
                "rate or set grad_clip (the checkpoint of the previous epoch is kept)"
            )
        val: dict[str, float | None] = {"loss": None, "accuracy": None}
        if val_set is not None:
            val = dict(evaluate(model, val_set, eval_batch, device, config.num_workers,
                                config.ignore_index))
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": float(correct) / max(1, int(counted)),
            "val_loss": val["loss"],
            "val_acc": val["accuracy"],
            "time": time.perf_counter() - t0,
        }
        for key in HISTORY_KEYS:
            history[key].append(row[key])
        if out_dir is not None:
            assert ckpt_path is not None
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _write_csv(ckpt_path.parent / LOG_NAME, history)
            save_checkpoint(
                ckpt_path,
                {
                    "model_name": model_name,
                    "model_kwargs": model_kwargs,
                    "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                    "steps_per_epoch": steps_per_epoch,
                    "history": history,
                    "config": config.to_dict(),
                    "rng": {**get_rng_state(), "loader": generator.get_state()},
                    "equivision_version": __version__,
                },
            )
        postfix = {"loss": f"{train_loss:.4f}", "acc": f"{row['train_acc']:.3f}"}
        if val["accuracy"] is not None:
            postfix["val_acc"] = f"{val['accuracy']:.3f}"
        epoch_bar.set_postfix(postfix)
        if callbacks:
            with preserve_rng_state():
                for callback in callbacks:
                    hook = getattr(callback, "on_epoch_end", None)
                    if hook is not None:
                        hook(epoch, model, {k: list(v) for k, v in history.items()})
    epoch_bar.close()
    return {k: list(v) for k, v in history.items()}
