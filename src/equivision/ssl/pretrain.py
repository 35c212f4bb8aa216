"""Self-supervised pretraining of an SSL method (MoCo-v3, DINO, Barlow Twins, +/- SER).

:func:`pretrain` drives the shared training runner (:func:`equivision.training.run`) with
a :class:`PretrainTask`, which holds only what is SSL's own: every step takes a batch of
images, draws two views per image with a :class:`~equivision.ssl.views.ViewSampler` (the
first ``round(r * B)`` images use the equivariant policy that feeds SER), calls
``method(view_batch)`` for the losses, and updates with AdamW (linear warm-up then cosine
learning rate; optional cosine weight-decay schedule; gradient clipping; bf16 autocast on
CUDA). After every epoch the runner writes, on rank 0 only:

* ``out_dir/last.pt`` -- an atomic checkpoint (:func:`equivision.checkpoint.save_checkpoint`)
  with the method's full state (student, teachers / EMA, projectors, DINO centre), the
  optimizer, the step counter, the logs, every process's RNG state, the encoder's
  constructor arguments and the method / SER configuration;
* ``out_dir/log.csv`` -- one row per epoch; ``out_dir/steps.csv`` -- one row per step
  (``loss``, ``loss_ssl``, ``loss_equiv``, ``lr``, ``weight_decay``, ``grad_norm``).

Resuming (``resume=True``) continues bit-identically: the data order and the views of a step
are drawn from generators seeded by ``(seed, epoch)`` and ``(seed, step, rank)``, the
schedules are functions of the step (DINO's teacher temperature included: it is set from the
step before every step, so the first resumed step uses the scheduled value), and the
remaining state is in the checkpoint.

Under ``torchrun`` (or any initialised ``torch.distributed`` process group) every process
takes its share ``batch[rank::world]`` of each global batch, gradients are averaged with
``all_reduce`` (gloo on CPU, NCCL on CUDA), the projectors' BatchNorm layers are
converted to :class:`~equivision.ssl.syncbn.SyncBatchNorm` (statistics over the global
batch, on CPUs too), buffers are broadcast from rank 0 after every step as DDP does, and
only rank 0 writes files.

Example::

    encoder = SSLViT(image_size=32, patch_size=4, dim=192, depth=6, heads=3, cls_layer=4)
    method = build_method("mocov3", encoder, SERConfig(weight=0.5))
    history = pretrain(method, photos("train"), PretrainConfig(epochs=100), out_dir="runs/x")
    encoder, info = load_pretrained("runs/x/last.pt")
"""

from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, check_weights_only_safe, load_checkpoint
from ..data.seeding import derived_generator
from ..training.distributed import (
    broadcast_buffers,
    broadcast_state,
    dist_info,
    maybe_init_distributed,
    sync_grads,
)
from ..training.resume import config_differences
from ..training.runner import CHECKPOINT_NAME, RunOptions, TrainingTask, run
from ..utils import resolve_device, seed_everything
from . import methods
from .methods import SERConfig, build_method
from .schedules import cosine, warmup_cosine
from .syncbn import convert_sync_batchnorm
from .views import BasePolicy, EquivariantPolicy, ViewSampler, local_policy
from .vit import SSLViT

__all__ = [
    "PretrainConfig",
    "PretrainError",
    "PretrainTask",
    "pretrain",
    "load_pretrained",
    "load_method",
    "config_differences",
    "default_views",
    "CHECKPOINT_NAME",
    "EPOCH_KEYS",
    "STEP_KEYS",
]

#: Columns of ``log.csv`` and keys of the returned history.
EPOCH_KEYS = ("epoch", "step", "lr", "weight_decay", "loss", "loss_ssl", "loss_equiv", "time")
#: Columns of ``steps.csv``.
STEP_KEYS = ("step", "epoch", "lr", "weight_decay", "loss", "loss_ssl", "loss_equiv",
             "grad_norm")
#: PretrainConfig fields that may change when resuming without breaking exactness.
_RESUME_FREE = ("epochs", "device")
_CKPT_KEYS = ("model", "encoder", "encoder_config", "optimizer", "epoch", "step", "config",
              "history", "rng")


class PretrainError(RuntimeError):
    """Pretraining cannot go on (a non-finite loss, bad method outputs, no full batch)."""


@dataclass
class PretrainConfig:
    """Settings of :func:`pretrain`.

    Attributes:
        epochs: total epochs (the schedules span all of them).
        batch_size: global batch size (split over processes; each epoch drops the last
            incomplete batch).
        lr: peak learning rate after warm-up.
        min_lr: learning rate at the end of the cosine decay.
        warmup_epochs: epochs (may be fractional) of linear warm-up from 0.
        weight_decay: AdamW weight decay (not applied to biases, norms, tokens, positions).
        weight_decay_end: if set, weight decay follows a cosine from ``weight_decay`` to this
            value (DINO); None keeps it constant.
        betas: AdamW betas.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        ratio: r, the fraction of each batch that gets equivariant views (SER sub-batch).
        seed: seeds model-independent randomness (data order, views) and, for a fresh run,
            the global RNGs (build the method after your own seeding: initialisation happens
            before :func:`pretrain`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... (under torchrun with
            ``"auto"`` each process takes ``cuda:LOCAL_RANK``).
        amp: ``"auto"`` (bf16 autocast on CUDA, off elsewhere), ``"bf16"`` (also on CPU) or
            ``"off"``.
        local_crops: multi-crop's small local views per image besides the two global
            ones (0: two views); used by :func:`default_views` (a ``views=`` sampler of
            your own brings its own).
        local_size: their side in pixels, a multiple of the patch size (None: half the
            image size, rounded down to the patch size).
    """

    epochs: int = 100
    batch_size: int = 256
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.1
    weight_decay_end: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 3.0
    ratio: float = 0.01
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    local_crops: int = 0
    local_size: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"PretrainConfig.{name} must be {rule}, got "
                              f"{getattr(self, name)!r}")

        def num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "an integer >= 1")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        if not num(self.lr) or self.lr <= 0:
            raise bad("lr", "a number > 0")
        for name in ("min_lr", "warmup_epochs", "weight_decay"):
            if not num(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a number >= 0")
        if self.warmup_epochs > self.epochs:
            raise bad("warmup_epochs", f"at most epochs={self.epochs}")
        if self.weight_decay_end is not None and (
            not num(self.weight_decay_end) or self.weight_decay_end < 0
        ):
            raise bad("weight_decay_end", "None or a number >= 0")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "two numbers in [0, 1)")
        if self.grad_clip is not None and (not num(self.grad_clip) or self.grad_clip <= 0):
            raise bad("grad_clip", "None or a number > 0")
        if not num(self.ratio) or not 0 <= self.ratio <= 1:
            raise bad("ratio", "a number in [0, 1]")
        if self.amp not in ("auto", "bf16", "off"):
            raise bad("amp", "'auto', 'bf16' or 'off'")
        if not isinstance(self.local_crops, int) or isinstance(self.local_crops, bool) \
                or self.local_crops < 0:
            raise bad("local_crops", "an integer >= 0")
        if self.local_size is not None and (not isinstance(self.local_size, int)
                                            or isinstance(self.local_size, bool)
                                            or self.local_size < 1):
            raise bad("local_size", "None or an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (stored in checkpoints)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown PretrainConfig key(s) {extra}; known: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------- helpers


def _device(config: PretrainConfig, world: int) -> torch.device:
    """The device of this process (``cuda:LOCAL_RANK`` under torchrun with ``"auto"``)."""
    if config.device == "auto" and torch.cuda.is_available() and world > 1:
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(dev)  # NCCL collectives use the current device
        return dev
    return resolve_device(config.device)


def _images_of(dataset: Any) -> Tensor:
    """All images of ``dataset`` as one tensor ``(N, C, H, W)``."""
    if isinstance(dataset, Tensor):
        images = dataset
    elif isinstance(getattr(dataset, "images", None), Tensor):
        images = dataset.images
    else:
        if not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise ValueError("the pretraining dataset must be a non-empty image tensor, "
                             "ImageDataset or map-style dataset")
        items = [dataset[i] for i in range(len(dataset))]
        images = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"pretraining images must be floating (N, C, H, W) in [0, 1], got "
                         f"{tuple(images.shape)} {images.dtype}")
    return images


def _check_fits(images: Tensor, encoder: nn.Module) -> None:
    """Refuse images ``(N, C, H, W)`` of another size or channel count than the encoder's."""
    size = getattr(encoder, "image_size", None)
    ch = getattr(encoder, "in_channels", None)
    if size is not None and tuple(images.shape[1:]) != (ch, size, size):
        raise ValueError(
            f"the pretraining images are {tuple(images.shape[1:])} but the encoder expects "
            f"({ch}, {size}, {size}); fit them with equivision.ssl.probe.fit_dataset(dataset, "
            f"{size}, {ch}) or build the encoder for this size"
        )


def _plain(value: Any) -> Any:
    """A dataclass / tuple / dict turned into weights-only-safe plain values."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def _method_name(method: nn.Module) -> str:
    """The :func:`~equivision.ssl.methods.build_method` name of ``method``'s class, or the
    lower-cased class name for methods outside that registry."""
    for key in methods.SSL_METHODS:
        if type(method) is methods.SSL_METHODS.get(key):
            return key
    return type(method).__name__.lower()


def _method_identity(method: nn.Module, method_kwargs: dict[str, Any] | None
                     ) -> dict[str, Any]:
    """Name, keyword arguments and SER configuration of ``method`` (plain values)."""
    name = _method_name(method)
    recorded = getattr(method, "method_kwargs", None)
    kwargs = {**(recorded if isinstance(recorded, dict) else {}), **(method_kwargs or {})}
    ser = getattr(method, "ser", None)
    out = {"method_name": name, "method_class": f"{type(method).__module__}."
           f"{type(method).__qualname__}", "method_kwargs": _plain(kwargs or {}),
           "ser_config": _plain(ser)}
    check_weights_only_safe(out, "method identity")
    return out


def default_views(encoder: nn.Module, ratio: float, local_crops: int = 0,
                  local_size: int | None = None) -> Callable[..., Any]:
    """The standard view sampler for ``encoder``'s image size: the base SSL policy ``T`` for
    ``1 - r`` of each batch and the equivariant policy ``T_eq`` for the first ``r``; with
    ``local_crops > 0`` that many multi-crop local views of every image
    (:func:`~equivision.ssl.views.local_policy`, ``local_size`` px; default half the image
    size, rounded down to the patch size)."""
    size = int(getattr(encoder, "image_size", 32))
    patch = int(getattr(encoder, "patch_size", 4))
    base = _build(BasePolicy, image_size=size)
    eq = _build(EquivariantPolicy, image_size=size, patch_size=patch) if ratio > 0 else None
    if not local_crops:
        return ViewSampler(base, eq, ratio)
    side = local_size if local_size is not None else max(patch, size // 2 // patch * patch)
    return ViewSampler(base, eq, ratio, local_policy(side, patch), local_crops)


def _build(cls: Any, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` keeping only the keyword arguments its constructor accepts."""
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return cls(**kwargs)
    return cls(**{k: v for k, v in kwargs.items() if k in params})


def _param_groups(method: nn.Module) -> list[dict[str, Any]]:
    """Decay (matrices, conv kernels) and no-decay (biases, norms, tokens) groups."""
    decay, no_decay = [], []
    for name, p in method.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() <= 1 or name.endswith(("pos_embed", "cls_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "weight_decay": 0.0,
                                                "decay": False}]


def _scalar(out: dict[str, Any], key: str, device: torch.device) -> Tensor:
    """``out[key]`` as a detached 0-dim float tensor (0 when absent)."""
    v = out.get(key)
    if v is None:
        return torch.zeros((), device=device)
    return v.detach().float() if isinstance(v, Tensor) else torch.tensor(float(v),
                                                                       device=device)


def _follow_step(method: nn.Module, step: int, total_steps: int) -> None:
    """Put the method's step-dependent state at ``step``: every submodule with a
    ``set_progress(step, total_steps)`` (DINO's teacher temperature) is set from the step,
    so that the first step of a resumed run uses the scheduled value, not the initial one."""
    for module in method.modules():
        set_progress = getattr(module, "set_progress", None)
        if callable(set_progress):
            set_progress(step, total_steps)


class _Schedule:
    """Learning rate and weight decay as functions of the global step."""

    def __init__(self, config: PretrainConfig, steps_per_epoch: int) -> None:
        self.config = config
        self.total_steps = steps_per_epoch * config.epochs
        self.warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))

    def lr(self, step: int) -> float:
        """Linear warm-up then cosine decay from ``lr`` to ``min_lr``."""
        c = self.config
        return warmup_cosine(step, self.total_steps, self.warmup_steps, c.lr, c.min_lr)

    def weight_decay(self, step: int) -> float:
        """Constant, or a cosine to ``weight_decay_end``."""
        c = self.config
        if c.weight_decay_end is None:
            return c.weight_decay
        return cosine(step, self.total_steps, c.weight_decay, c.weight_decay_end)


# ----------------------------------------------------------------------------- the task


class PretrainTask(TrainingTask):
    """One SSL pretraining run as a :class:`~equivision.training.runner.TrainingTask`:
    the SSL step (views, method loss, gradient averaging over processes, AdamW with the
    step's learning rate and weight decay, teacher update), its configuration check and
    its per-step log ``steps.csv``."""

    log_keys = EPOCH_KEYS
    required_keys = _CKPT_KEYS

    def __init__(self, method: nn.Module, images: Tensor, config: PretrainConfig,
                 views: Callable[..., Any] | None, method_kwargs: dict[str, Any] | None,
                 progress: bool) -> None:
        self.model = self.method = method
        self.encoder: nn.Module = method.backbone
        self.images, self.config = images, config
        self.rank, self.world = dist_info()
        self.steps_per_epoch = len(images) // config.batch_size
        self.schedule = _Schedule(config, self.steps_per_epoch)
        self.device = _device(config, self.world)
        self.use_amp = config.amp == "bf16" or (config.amp == "auto"
                                                and self.device.type == "cuda")
        self.identity = _method_identity(method, method_kwargs)
        self.encoder_config = _plain(self.encoder.config()) if hasattr(
            self.encoder, "config") else {}
        if self.world > 1:  # projector BatchNorm over the global batch (MoCo-v3, Barlow)
            convert_sync_batchnorm(method)
        method.to(self.device)
        groups = _param_groups(method)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.views = default_views(self.encoder, config.ratio, config.local_crops,
                                   config.local_size) if views is None else views
        self.step_log: dict[str, list[Any]] = {k: [] for k in STEP_KEYS}
        self.step = 0
        self.progress = progress and self.rank == 0

    def start(self) -> None:
        seed_everything(self.config.seed)
        if self.world > 1:
            broadcast_state(self.method)

    def _identity_now(self) -> dict[str, Any]:
        return {"encoder": self.encoder_config, "method": self.identity["method_name"],
                "method_kwargs": self.identity["method_kwargs"],
                "ser": self.identity["ser_config"], "config": _plain(self.config.to_dict())}

    def check_resume(self, ckpt: dict[str, Any], where: str) -> list[str]:
        config = ckpt.get("config")
        if isinstance(config, dict):  # written before multi-crop: two views
            config = {"local_crops": 0, "local_size": None, **config}
        saved = {"encoder": ckpt.get("encoder_config"), "method": ckpt.get("method_name"),
                 "method_kwargs": ckpt.get("method_kwargs"), "ser": ckpt.get("ser_config"),
                 "config": config}
        diffs = config_differences(saved, self._identity_now(),
                                   ignore=tuple(f"config.{k}" for k in _RESUME_FREE))
        if ckpt.get("steps_per_epoch") != self.steps_per_epoch:
            diffs.append(f"steps_per_epoch: {ckpt.get('steps_per_epoch')!r} -> "
                         f"{self.steps_per_epoch} (did the dataset or batch size change?)")
        return diffs

    def restore(self, ckpt: dict[str, Any], where: str) -> None:
        try:
            self.method.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{where} does not fit this method/optimizer: {e}") from e
        for group, fresh in zip(self.optimizer.param_groups, _param_groups(self.method)):
            group["decay"] = fresh["decay"]
        self.step_log = {k: list(ckpt.get("steps", {}).get(k, [])) for k in STEP_KEYS}
        self.step = int(ckpt["step"])
        old_epochs = (ckpt.get("config") or {}).get("epochs")
        if old_epochs != self.config.epochs:
            warnings.warn(f"{where} was started for {old_epochs} epochs, now "
                          f"{self.config.epochs}: the learning-rate, weight-decay and teacher "
                          "schedules are stretched to the new length, so the run differs from "
                          "one planned that way", stacklevel=5)

    def _set_optimizer(self, lr: float, wd: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("decay", True):
                group["weight_decay"] = wd

    def _losses(self, x: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """The method's loss on views of ``x`` and the process-mean of its three parts."""
        batch = self.views(x, derived_generator("pretrain-views", self.config.seed,
                                                self.step, self.rank))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            out = self.method(batch)
        if not isinstance(out, dict) or not isinstance(out.get("loss"), Tensor):
            raise PretrainError("the method must return a dict with a 'loss' tensor")
        vals = torch.stack([_scalar(out, k, self.device) for k in
                            ("loss", "loss_ssl", "loss_equiv")]).double()
        if self.world > 1:
            dist.all_reduce(vals)
            vals /= self.world
        if not math.isfinite(float(vals[0])):  # checked before the update touches weights
            raise PretrainError(
                f"the loss became {float(vals[0])} at step {self.step} (epoch {epoch}); lower "
                "the learning rate or set grad_clip (the previous epoch's checkpoint is kept)")
        return out["loss"], vals

    def _update(self, loss: Tensor) -> float:
        """Backward, average gradients, clip, step; returns the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.params, self.world)
        if self.config.grad_clip is not None:
            grad_norm = float(nn.utils.clip_grad_norm_(self.params, self.config.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [p.grad.norm() for p in self.params if p.grad is not None])))
        self.optimizer.step()
        return grad_norm

    def _train_step(self, x: Tensor, epoch: int) -> list[float]:
        """One SSL step on this process's images ``x`` ``(B / world, C, H, W)``; returns
        the process-mean ``[loss, loss_ssl, loss_equiv]``."""
        lr, wd = self.schedule.lr(self.step), self.schedule.weight_decay(self.step)
        self._set_optimizer(lr, wd)
        _follow_step(self.method, self.step, self.schedule.total_steps)
        loss, vals = self._losses(x, epoch)
        grad_norm = self._update(loss)
        on_step_end = getattr(self.method, "on_step_end", None)
        if on_step_end is not None:
            on_step_end(self.step, self.schedule.total_steps)
        if self.world > 1:
            broadcast_buffers(self.method)
        v = vals.tolist()
        row = {"step": self.step, "epoch": epoch, "lr": lr, "weight_decay": wd, "loss": v[0],
               "loss_ssl": v[1], "loss_equiv": v[2], "grad_norm": grad_norm}
        for k in STEP_KEYS:
            self.step_log[k].append(row[k])
        self.step += 1
        self.end_step(self.step)  # the runner's step hooks (e.g. an online k-NN monitor)
        return v

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.method.train()
        size = self.config.batch_size
        order = torch.randperm(len(self.images), generator=derived_generator(
            "pretrain-order", self.config.seed, epoch))
        sums = torch.zeros(3, dtype=torch.float64)
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch}/{self.config.epochs}",
                   leave=False, disable=not self.progress)
        for b in bar:
            idx = order[b * size : (b + 1) * size][self.rank::self.world]
            v = self._train_step(self.images[idx].to(self.device, non_blocking=True), epoch)
            sums += torch.tensor(v, dtype=torch.float64)
            if self.progress and b % 10 == 0:
                bar.set_postfix(loss=f"{v[0]:.4f}", equiv=f"{v[2]:.4f}")
        means = (sums / self.steps_per_epoch).tolist()
        last = self.step - 1
        return {"epoch": epoch, "step": self.step, "lr": self.schedule.lr(last),
                "weight_decay": self.schedule.weight_decay(last), "loss": means[0],
                "loss_ssl": means[1], "loss_equiv": means[2], "time": time.perf_counter() - t0}

    def state(self) -> dict[str, Any]:
        return {
            **self.identity,
            "kind": "ssl-pretrain",
            "model": self.method.state_dict(),
            "encoder": self.encoder.state_dict(),
            "encoder_config": self.encoder_config,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world,
            "config": _plain(self.config.to_dict()),
            "steps": self.step_log,
        }

    def extra_logs(self) -> dict[str, tuple[tuple[str, ...], dict[str, list[Any]]]]:
        return {"steps.csv": (STEP_KEYS, self.step_log)}

    def summary(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "equiv": f"{row['loss_equiv']:.4f}"}


# ----------------------------------------------------------------------------- pretrain


def pretrain(
    method: nn.Module,
    dataset: Any,
    config: PretrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    views: Callable[..., Any] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    method_kwargs: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, list[Any]]:
    """Pretrain ``method`` (in place) on the images of ``dataset``.

    Args:
        method: an :class:`~equivision.ssl.methods.SSLMethod` (``method(view_batch)`` returns
            ``{"loss", "loss_ssl", "loss_equiv"}``; ``method.on_step_end(step, total)``
            updates teachers; ``method.backbone`` is the encoder).
        dataset: images ``(N, C, H, W)`` in ``[0, 1]`` as a tensor, an
            :class:`~equivision.data.ImageDataset` (labels are ignored) or a map-style
            dataset of images or ``(image, label)``; they must fit the encoder.
        config: the settings (default ``PretrainConfig()``).
        out_dir: where rank 0 writes ``last.pt``, ``log.csv`` and ``steps.csv`` after every
            epoch (None: nothing is written and resuming is impossible).
        resume: continue from ``out_dir/last.pt``; the method must be built with the same
            encoder / method / SER configuration and the config may differ only in
            ``epochs`` and ``device``. With ``resume=False`` an existing checkpoint is never
            overwritten (``FileExistsError``).
        views: the view sampler ``views(images, generator) -> ViewBatch`` (default
            :func:`default_views` with ``config.ratio``).
        stop_after: stop after this epoch as if interrupted (the schedules still span
            ``config.epochs``); used to test resuming and to train in slices.
        progress: show tqdm progress bars (rank 0).
        method_kwargs: the keyword arguments the method was built with (beyond encoder and
            SER config), recorded so that :func:`load_method` can rebuild it; they update
            the method's own ``method_kwargs`` attribute (which the built-in methods fill
            with all their constructor arguments), so they are rarely needed.
        callbacks: objects with ``on_epoch_end(epoch, model, history)`` and / or
            ``on_step_end(step, model)``, run by the shared runner after each epoch / each
            step (``step`` from 1; e.g. :class:`~equivision.ssl.probe.KNNMonitor`).

    Returns:
        The history: a dict of equal-length lists keyed by :data:`EPOCH_KEYS` (epoch means of
        the losses over all processes; ``lr`` and ``weight_decay`` at the epoch's last step).

    Raises:
        FileExistsError: a checkpoint exists in ``out_dir`` and ``resume`` is False.
        CheckpointError: the checkpoint is unreadable or from another configuration (the
            message names the differing keys).
        PretrainError: fewer images than one batch, bad method outputs, a non-finite loss.
    """
    config = PretrainConfig() if config is None else config
    if not isinstance(config, PretrainConfig):
        raise TypeError(f"config must be a PretrainConfig, got {type(config).__name__}")
    encoder = getattr(method, "backbone", None)
    if not isinstance(encoder, nn.Module):
        raise TypeError("method must have a 'backbone' encoder module (an SSLMethod from "
                        "equivision.ssl.methods)")
    maybe_init_distributed(config.device)
    world = dist_info()[1]
    images = _images_of(dataset)
    _check_fits(images, encoder)
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of "
                         f"processes ({world})")
    if len(images) < config.batch_size:
        raise PretrainError(f"{len(images)} images are fewer than one batch of "
                            f"{config.batch_size}; lower batch_size")
    task = PretrainTask(method, images, config, views, method_kwargs, progress)
    return run(task, RunOptions(epochs=config.epochs, out_dir=out_dir, resume=resume,
                                stop_after=stop_after, progress=progress, desc="pretrain",
                                callbacks=tuple(callbacks)))


# ----------------------------------------------------------------------------- loading


def load_pretrained(
    path: str | os.PathLike,
    encoder: nn.Module | None = None,
    map_location: Any = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """The pretrained encoder of a :func:`pretrain` checkpoint, in eval mode, and its info.

    Args:
        path: a ``last.pt`` written by :func:`pretrain`.
        encoder: optional encoder to load into; its ``config()`` must match the stored one
            (otherwise a ``CheckpointError`` names the differing keys). None: a new
            :class:`~equivision.ssl.vit.SSLViT` is built from the stored configuration.

    Returns:
        ``(encoder, info)`` with ``info`` = ``{"encoder_config", "method_name",
        "method_kwargs", "ser_config", "config", "epoch", "history"}`` (plain values).
    """
    ckpt = load_checkpoint(path, map_location, required_keys=("encoder", "encoder_config"))
    cfg = ckpt["encoder_config"]
    if encoder is None:
        try:
            encoder = SSLViT(**cfg)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint file {str(path)!r} stores the encoder "
                                  f"configuration {cfg}, which cannot be built: {e}") from e
    elif hasattr(encoder, "config"):
        diffs = config_differences(cfg, _plain(encoder.config()))
        if diffs:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} holds an encoder with another configuration; "
                f"differing keys (checkpoint -> given): {'; '.join(diffs)}")
    try:
        encoder.load_state_dict(ckpt["encoder"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} does not fit the encoder: "
                              f"{e}") from e
    info = {k: ckpt.get(k) for k in ("encoder_config", "method_name", "method_kwargs",
                                     "ser_config", "config", "epoch", "history")}
    return encoder.eval(), info


def load_method(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[nn.Module,
                                                                               dict[str, Any]]:
    """Rebuild the whole SSL method (student, teachers, heads) of a :func:`pretrain`
    checkpoint with :func:`equivision.ssl.methods.build_method` and load its state.

    Returns:
        ``(method, info)`` as in :func:`load_pretrained`.
    """
    encoder, info = load_pretrained(path, map_location=map_location)
    ckpt = load_checkpoint(path, map_location, required_keys=("model",))
    ser = info["ser_config"]
    ser_obj = None if ser is None else _build(SERConfig, **ser)
    kwargs = dict(info["method_kwargs"] or {})
    try:
        method = build_method(info["method_name"], encoder, ser_obj, **kwargs)
        method.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r}: cannot rebuild method "
                              f"{info['method_name']!r} with {kwargs}: {e}") from e
    return method, info
