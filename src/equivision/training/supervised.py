"""Supervised training: a classifier or segmenter with cross-entropy, driven by the runner.

:func:`train` trains a classifier (logits ``(N, K)``, labels ``(N,)``) or a segmenter (dense
logits ``(N, K, H, W)``, label maps ``(N, H, W)`` with ``TrainConfig.ignore_index`` pixels left
out) with cross-entropy. :func:`equivision.training.runner.run` logs every epoch to
``out_dir/log.csv`` and writes an atomic checkpoint ``out_dir/last.pt`` after every epoch.
The checkpoint holds the model, optimizer and scheduler state, the history, the config and
every RNG state (torch CPU/CUDA, Python ``random``, NumPy and the data loader's shuffling
generator), so that ``resume=True`` continues an interrupted run exactly: the result is
bit-identical to an uninterrupted run on the same hardware and software.

Example::

    model = create_model("cnn7")
    history = train(model, train_set, val_set, TrainConfig(epochs=30), out_dir="runs/cnn7")
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, _load_weights, check_weights_only_safe
from ..metrics import ConfusionMeter
from ..models.registry import checkpoint_arguments
from ..utils import model_device, resolve_device, seed_everything
from .batches import (
    apply_augment,
    batch_loss,
    check_outputs,
    num_items,
    seed_worker,
    soft_targets,
    unpack_batch,
)
from .config import TrainConfig, TrainError
from .optim import make_optimizer, make_scheduler
from .resume import config_differences
from .runner import RunOptions, TrainingTask, run

__all__ = ["train", "evaluate", "SupervisedTask", "HISTORY_KEYS"]

#: Columns of the history dict and of ``log.csv``, in order.
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "time")
#: Config fields that may change between an interrupted run and its resumption silently.
_RESUME_FREE = ("epochs", "device", "num_workers", "eval_batch_size")
#: ``run_info`` keys that a resumed run must share with its checkpoint
_RUN_INFO_FIXED = ("augment", "data", "input_shape")
_TRAIN_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "rng", "config")


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator,
            num_workers: int, device: torch.device) -> DataLoader:
    """A data loader whose shuffling (and workers' seeds) come from ``generator`` only."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      worker_init_fn=seed_worker if num_workers > 0 else None)


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
    num_items(dataset, "evaluation")
    dev = model_device(model) if device is None else resolve_device(device)
    model.to(dev)
    loader = _loader(dataset, batch_size, False, torch.Generator(), num_workers, dev)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen = torch.zeros((), dtype=torch.int64, device=dev)  # images or valid pixels
    meter: ConfusionMeter | None = None
    try:
        for batch in loader:
            x, y = unpack_batch(batch)
            x, y_dev = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            out = model(x)
            check_outputs(out, y, ignore_index)
            dense = y.dim() == 3
            valid = y_dev != ignore_index if dense else torch.ones_like(y_dev, dtype=torch.bool)
            total += F.cross_entropy(out.float(), y_dev, reduction="sum",
                                     ignore_index=ignore_index if dense else -100).double()
            correct += ((out.argmax(1) == y_dev) & valid).sum()
            seen += valid.sum()
            if dense:
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


def _model_identity(model: nn.Module) -> tuple[str | None, dict[str, Any] | None]:
    """The ``create_model`` name and arguments of ``model`` (None, None when unknown or
    not storable in a weights-only checkpoint)."""
    name = getattr(model, "equivision_name", None)
    kwargs = getattr(model, "equivision_kwargs", None)
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        return None, None
    try:
        check_weights_only_safe(kwargs, "model_kwargs")
    except TypeError as e:
        warnings.warn(
            f"the checkpoint will not record how to rebuild model {name!r}: {e}", stacklevel=4
        )
        return None, None
    return name, dict(kwargs)


def _check_resume_model(model: nn.Module, ckpt: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint of another model (name, arguments or class)."""
    name, kwargs = _model_identity(model)
    c_name, c_kwargs = ckpt.get("model_name"), ckpt.get("model_kwargs")
    if isinstance(c_name, str) and isinstance(c_kwargs, dict):
        c_kwargs = checkpoint_arguments(c_name, c_kwargs)  # arguments added since it was saved
    if name is not None and c_name is not None and (name, kwargs) != (c_name, c_kwargs):
        raise CheckpointError(
            f"cannot resume from {where}: it holds model {c_name!r} with arguments "
            f"{c_kwargs}, but the model passed to train() is {name!r} with arguments {kwargs}. "
            "Build the same model to resume, or train into another out_dir"
        )
    c_class = ckpt.get("model_class")
    own_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if isinstance(c_class, str) and c_class != own_class:
        raise CheckpointError(
            f"cannot resume from {where}: it holds a {c_class}, but the model passed to "
            f"train() is a {own_class}. Build the same model to resume, or train into another "
            "out_dir"
        )


def _config_changes(old: Any, new: TrainConfig) -> list[str]:
    """Settings (outside ``_RESUME_FREE``) that differ from the checkpoint's."""
    if not isinstance(old, dict):
        return []
    changes = []
    for key, value in new.to_dict().items():
        if key in _RESUME_FREE or key not in old:
            continue
        if old[key] != value:
            changes.append(f"{key} ({old[key]!r} -> {value!r})")
    return changes


class _EpochMeter:
    """Running sums of one training epoch: loss (per image), correct and counted items."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.counted = torch.zeros((), dtype=torch.int64, device=device)  # images or pixels
        self.seen = 0

    def add(self, loss: Tensor, out: Tensor, hard: Tensor, valid: Tensor, n: int) -> None:
        """Count a batch of ``n`` images: its mean ``loss``, logits ``out`` and targets."""
        self.total += loss.detach().double() * n
        self.correct += ((out.detach().argmax(1) == hard) & valid).sum()
        self.counted += valid.sum()
        self.seen += n

    @property
    def loss(self) -> float:
        """Mean training loss so far."""
        return float(self.total) / self.seen

    @property
    def accuracy(self) -> float:
        """Training accuracy so far (pixel accuracy for segmentation)."""
        return float(self.correct) / max(1, int(self.counted))


class SupervisedTask(TrainingTask):
    """Cross-entropy training of ``model`` on ``train_set`` as a :class:`TrainingTask`."""

    log_keys = HISTORY_KEYS
    required_keys = _TRAIN_KEYS

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset | None,
                 config: TrainConfig, augment: Callable[..., Any] | None,
                 progress: bool, run_info: dict[str, Any] | None = None) -> None:
        n_train = num_items(train_set, "training")
        if val_set is not None:
            num_items(val_set, "validation")
        self.model, self.val_set, self.config = model, val_set, config
        self.augment, self.progress = augment, progress
        self.run_info = dict(run_info or {})
        check_weights_only_safe(self.run_info, "run_info")
        self.device = resolve_device(config.device)
        self.steps_per_epoch = math.ceil(n_train / config.batch_size)
        self.model_name, self.model_kwargs = _model_identity(model)
        model.to(self.device)
        self.optimizer = make_optimizer(model, config)
        self.scheduler = make_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.generator = torch.Generator()
        self.generator.manual_seed(config.seed)
        self.loader = _loader(train_set, config.batch_size, True, self.generator,
                              config.num_workers, self.device)

    def start(self) -> None:
        seed_everything(self.config.seed)

    def generators(self) -> dict[str, torch.Generator]:
        return {"loader": self.generator}

    def check_resume(self, ckpt: dict[str, Any], where: str) -> list[str]:
        old = ckpt["config"]
        changes = []
        if isinstance(old, dict) and old.get("optimizer") != self.config.optimizer:
            changes.append(f"optimizer: {old.get('optimizer')!r} -> {self.config.optimizer!r}")
        saved = ckpt.get("run_info")
        if isinstance(saved, dict):  # what the run was trained on (augmentation, data)
            changes += config_differences(
                {k: v for k, v in saved.items() if k in _RUN_INFO_FIXED},
                {k: v for k, v in self.run_info.items() if k in _RUN_INFO_FIXED})
        return changes

    def restore(self, ckpt: dict[str, Any], where: str) -> None:
        _check_resume_model(self.model, ckpt, where)
        _load_weights(self.model, ckpt, where)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"{where}: its optimizer/scheduler state does not fit this model and config: {e}"
            ) from e
        changes = _config_changes(ckpt["config"], self.config)
        if ckpt.get("steps_per_epoch") != self.steps_per_epoch:
            changes.append(f"steps per epoch ({ckpt.get('steps_per_epoch')} -> "
                           f"{self.steps_per_epoch}; did the training set change?)")
        if changes:
            warnings.warn(
                f"resuming {where} with settings that differ from the checkpoint's: "
                f"{', '.join(changes)}; the optimizer and scheduler state come from the "
                "checkpoint, so the run will not match an uninterrupted one", stacklevel=5)

    def _step(self, batch: Any, meter: _EpochMeter) -> None:
        """One optimizer step on a loader batch."""
        x, y = unpack_batch(batch)
        x, y_dev = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        target = y_dev
        if self.augment is not None:
            x, target = apply_augment(self.augment, x, y_dev)
        out = self.model(x)
        check_outputs(out, y, self.config.ignore_index)
        if target.dim() == 2:  # soft targets from a label-mixing augmentation
            target = soft_targets(target, out.shape[1])
            hard = target.argmax(1)
        else:
            if target is not y_dev:
                check_outputs(out, target, self.config.ignore_index)
            target = hard = target.long()
        loss, valid = batch_loss(out, target, self.config)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        meter.add(loss, out, hard, valid, y.shape[0])

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.model.train()
        meter = _EpochMeter(self.device)
        bar = tqdm(self.loader, desc=f"epoch {epoch}/{self.config.epochs}", leave=False,
                   disable=not self.progress)
        for step, batch in enumerate(bar):
            self._step(batch, meter)
            self.end_step((epoch - 1) * self.steps_per_epoch + step + 1)  # step hooks
            if self.progress and step % 20 == 0:
                bar.set_postfix(loss=f"{meter.loss:.4f}")
        if not math.isfinite(meter.loss):
            raise TrainError(
                f"the training loss became {meter.loss} in epoch {epoch}; lower the learning "
                "rate or set grad_clip (the checkpoint of the previous epoch is kept)"
            )
        val: dict[str, float | None] = {"loss": None, "accuracy": None}
        if self.val_set is not None:
            cfg = self.config
            val = dict(evaluate(self.model, self.val_set, cfg.eval_batch_size or cfg.batch_size,
                                self.device, cfg.num_workers, cfg.ignore_index))
        return {"epoch": epoch, "lr": lr, "train_loss": meter.loss,
                "train_acc": meter.accuracy, "val_loss": val["loss"], "val_acc": val["accuracy"],
                "time": time.perf_counter() - t0}

    def state(self) -> dict[str, Any]:
        model = self.model
        return {
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps_per_epoch": self.steps_per_epoch,
            "config": self.config.to_dict(),
            "run_info": self.run_info,
        }

    def summary(self, row: dict[str, Any]) -> dict[str, str]:
        out = {"loss": f"{row['train_loss']:.4f}", "acc": f"{row['train_acc']:.3f}"}
        if row["val_acc"] is not None:
            out["val_acc"] = f"{row['val_acc']:.3f}"
        return out


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
    run_info: dict[str, Any] | None = None,
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
            ``history`` is a copy), and ``on_step_end(step, model)``, called after every
            optimiser step (``step`` counts from 1 over the whole run, resumes included;
            e.g. :class:`equivision.ssl.probe.KNNMonitor` with ``every_steps``). They run with
            the RNG states preserved, so they do not change the training's random stream.
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
        run_info: plain values stored with the checkpoint under ``"run_info"``: what the
            run was trained on, e.g. ``{"augment": "crop,flip", "data": "digits",
            "input_shape": [1, 28, 28], "normalization": ...}``. Resuming with a different
            ``augment`` or ``data`` is refused (:class:`CheckpointError`), like a different
            optimizer.

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
    task = SupervisedTask(model, train_set, val_set, config, augment, progress, run_info)
    return run(task, RunOptions(epochs=config.epochs, out_dir=out_dir, resume=resume,
                                callbacks=list(callbacks), progress=progress))
