"""Settings of supervised training (:class:`TrainConfig`) and its error type."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["TrainConfig", "TrainError"]

_OPTIMIZERS = ("sgd", "adam", "adamw")
_SCHEDULES = ("cosine", "constant")


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
