"""Self-supervised pretraining of an SSL method (MoCo-v3, DINO, Barlow Twins, +/- SER).

:func:`pretrain` runs the loop: every step takes a batch of images, draws two views per image
with a :class:`~equivision.ssl.views.ViewSampler` (the first ``round(r * B)`` images use the
equivariant policy that feeds SER), calls ``method(view_batch)`` for the losses, and updates
with AdamW (linear warm-up then cosine learning rate; optional cosine weight-decay schedule;
gradient clipping; bf16 autocast on CUDA). After every epoch it writes, on rank 0 only:

* ``out_dir/last.pt`` -- an atomic checkpoint (:func:`equivision.checkpoint.save_checkpoint`)
  with the method's full state (student, teachers / EMA, projectors, DINO centre), the
  optimizer, the step counter, the logs, every process's RNG state, the encoder's
  constructor arguments and the method / SER configuration;
* ``out_dir/log.csv`` -- one row per epoch; ``out_dir/steps.csv`` -- one row per step
  (``loss``, ``loss_ssl``, ``loss_equiv``, ``lr``, ``weight_decay``, ``grad_norm``).

Resuming (``resume=True``) continues bit-identically: the data order and the views of a step
are drawn from generators seeded by ``(seed, epoch)`` and ``(seed, step, rank)``, the
schedules are functions of the step, and the remaining state is in the checkpoint.

Under ``torchrun`` (or any initialised ``torch.distributed`` process group) every process
takes its share ``batch[rank::world]`` of each global batch, gradients are averaged with
``all_reduce`` (gloo on CPU, NCCL on CUDA), buffers (BatchNorm statistics) are broadcast
from rank 0 after every step as DDP does, and only rank 0 writes files.

Example::

    encoder = SSLViT(image_size=32, patch_size=4, dim=192, depth=6, heads=3, cls_layer=4)
    method = build_method("mocov3", encoder, SERConfig(weight=0.5))
    history = pretrain(method, photos("train"), PretrainConfig(epochs=100), out_dir="runs/x")
    encoder, info = load_pretrained("runs/x/last.pt")
"""

from __future__ import annotations

import csv
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import CheckpointError, check_weights_only_safe, load_checkpoint, save_checkpoint
from ..data.seeding import derived_generator
from ..utils import get_rng_state, resolve_device, seed_everything, set_rng_state
from .schedules import cosine, warmup_cosine

__all__ = [
    "PretrainConfig",
    "PretrainError",
    "pretrain",
    "load_pretrained",
    "load_method",
    "config_differences",
    "default_views",
    "CHECKPOINT_NAME",
    "EPOCH_KEYS",
    "STEP_KEYS",
]

CHECKPOINT_NAME = "last.pt"
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


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _maybe_init_distributed(device_hint: str) -> None:
    """Initialise the default process group from torchrun's environment if needed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return
    if dist.is_initialized():
        return
    cuda = device_hint.startswith("cuda") or (device_hint == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if cuda else "gloo")


def _device(config: PretrainConfig) -> torch.device:
    if config.device == "auto" and torch.cuda.is_available() and _dist()[1] > 1:
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
    try:
        from .methods import _METHODS
    except ImportError:  # pragma: no cover
        _METHODS = {}
    for key, cls in _METHODS.items():
        if type(method) is cls:
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


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys (dotted for nested dicts) whose values differ, as ``"key: saved -> current"``."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in ignore or key in ignore:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, list) and isinstance(vb, (list, tuple)):
            vb = list(vb)
        if va != vb:
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs


def default_views(encoder: nn.Module, ratio: float) -> Callable[..., Any]:
    """The standard view sampler for ``encoder``'s image size: the base SSL policy ``T`` for
    ``1 - r`` of each batch and the equivariant policy ``T_eq`` for the first ``r``."""
    from . import views as V

    size = int(getattr(encoder, "image_size", 32))
    patch = int(getattr(encoder, "patch_size", 4))
    base = _build(V.BasePolicy, image_size=size)
    eq = _build(V.EquivariantPolicy, image_size=size, patch_size=patch) if ratio > 0 else None
    return V.ViewSampler(base, eq, ratio)


def _build(cls: Any, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` keeping only the keyword arguments its constructor accepts."""
    import inspect

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


def _sync_grads(params: list[nn.Parameter], world: int) -> None:
    """Average gradients over processes (missing gradients count as zeros)."""
    if world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def _broadcast_state(method: nn.Module) -> None:
    """Give every process rank 0's parameters and buffers."""
    for t in method.state_dict().values():
        if isinstance(t, Tensor):
            dist.broadcast(t, 0)


def _broadcast_buffers(method: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, centres) to every process, as DDP does."""
    for b in method.buffers():
        dist.broadcast(b, 0)


def _scalar(out: dict[str, Any], key: str, device: torch.device) -> Tensor:
    v = out.get(key)
    if v is None:
        return torch.zeros((), device=device)
    return v.detach().float() if isinstance(v, Tensor) else torch.tensor(float(v),
                                                                       device=device)


def _write_csv(path: Path, keys: tuple[str, ...], rows: dict[str, list[Any]]) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for i in range(len(rows[keys[0]])):
                w.writerow(["" if rows[k][i] is None else rows[k][i] for k in keys])
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir of the run to resume")
    _maybe_init_distributed(config.device)
    rank, world = _dist()
    images = _images_of(dataset)
    _check_fits(images, encoder)
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of "
                         f"processes ({world})")
    steps_per_epoch = len(images) // config.batch_size
    if steps_per_epoch == 0:
        raise PretrainError(f"{len(images)} images are fewer than one batch of "
                            f"{config.batch_size}; lower batch_size")
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    device = _device(config)
    use_amp = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    identity = _method_identity(method, method_kwargs)
    encoder_config = _plain(encoder.config()) if hasattr(encoder, "config") else {}

    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    ckpt: dict[str, Any] | None = None
    if ckpt_path is not None and ckpt_path.exists():
        if not resume:
            raise FileExistsError(
                f"{str(ckpt_path)!r} already exists; pass resume=True to continue that run or "
                "choose another out_dir"
            )
        ckpt = load_checkpoint(ckpt_path, required_keys=_CKPT_KEYS)
    elif resume:
        warnings.warn(f"resume=True but there is no checkpoint {str(ckpt_path)!r}; starting "
                      "a fresh run", stacklevel=2)

    if ckpt is None:
        seed_everything(config.seed)
    method.to(device)
    groups = _param_groups(method)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    history: dict[str, list[Any]] = {k: [] for k in EPOCH_KEYS}
    step_log: dict[str, list[Any]] = {k: [] for k in STEP_KEYS}
    start_epoch, step = 0, 0
    if ckpt is not None:
        assert ckpt_path is not None
        start_epoch, step, history, step_log = _restore(
            ckpt, ckpt_path, method, optimizer, config, identity, encoder_config,
            steps_per_epoch, rank, world)
    elif world > 1:
        _broadcast_state(method)
    if views is None:
        views = default_views(encoder, config.ratio)

    def lr_at(s: int) -> float:
        return warmup_cosine(s, total_steps, warmup_steps, config.lr, config.min_lr)

    def wd_at(s: int) -> float:
        if config.weight_decay_end is None:
            return config.weight_decay
        return cosine(s, total_steps, config.weight_decay, config.weight_decay_end)

    last_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
    show = progress and rank == 0
    epoch_bar = tqdm(range(start_epoch, last_epoch), initial=start_epoch, total=config.epochs,
                     desc="pretrain", disable=not show)
    for index in epoch_bar:
        epoch = index + 1
        t0 = time.perf_counter()
        method.train()
        order = torch.randperm(len(images), generator=derived_generator(
            "pretrain-order", config.seed, epoch))
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}", leave=False,
                   disable=not show)
        for b in bar:
            idx = order[b * config.batch_size : (b + 1) * config.batch_size][rank::world]
            x = images[idx].to(device, non_blocking=True)
            lr, wd = lr_at(step), wd_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
                if group.get("decay", True):
                    group["weight_decay"] = wd
            gen = derived_generator("pretrain-views", config.seed, step, rank)
            batch = views(x, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = method(batch)
            if not isinstance(out, dict) or not isinstance(out.get("loss"), Tensor):
                raise PretrainError("the method must return a dict with a 'loss' tensor")
            loss = out["loss"]
            vals = torch.stack([_scalar(out, k, device) for k in
                                ("loss", "loss_ssl", "loss_equiv")]).double()
            if world > 1:
                dist.all_reduce(vals)
                vals /= world
            v = vals.tolist()
            if not math.isfinite(v[0]):  # checked before the update touches the weights
                raise PretrainError(
                    f"the loss became {v[0]} at step {step} (epoch {epoch}); lower the learning "
                    "rate or set grad_clip (the previous epoch's checkpoint is kept)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _sync_grads(params, world)
            if config.grad_clip is not None:
                grad_norm = float(nn.utils.clip_grad_norm_(params, config.grad_clip))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in params if p.grad is not None])))
            optimizer.step()
            on_step_end = getattr(method, "on_step_end", None)
            if on_step_end is not None:
                on_step_end(step, total_steps)
            if world > 1:
                _broadcast_buffers(method)
            sums += vals
            row = {"step": step, "epoch": epoch, "lr": lr, "weight_decay": wd, "loss": v[0],
                   "loss_ssl": v[1], "loss_equiv": v[2], "grad_norm": grad_norm}
            for k in STEP_KEYS:
                step_log[k].append(row[k])
            step += 1
            if show and b % 10 == 0:
                bar.set_postfix(loss=f"{v[0]:.4f}", equiv=f"{v[2]:.4f}")
        means = (sums / steps_per_epoch).tolist()
        erow = {"epoch": epoch, "step": step, "lr": lr_at(step - 1),
                "weight_decay": wd_at(step - 1), "loss": means[0], "loss_ssl": means[1],
                "loss_equiv": means[2], "time": time.perf_counter() - t0}
        for k in EPOCH_KEYS:
            history[k].append(erow[k])
        rng = _gather_rng(world)
        if rank == 0 and ckpt_path is not None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _write_csv(ckpt_path.parent / "log.csv", EPOCH_KEYS, history)
            _write_csv(ckpt_path.parent / "steps.csv", STEP_KEYS, step_log)
            save_checkpoint(ckpt_path, {
                **identity,
                "kind": "ssl-pretrain",
                "model": method.state_dict(),
                "encoder": encoder.state_dict(),
                "encoder_config": encoder_config,
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "step": step,
                "steps_per_epoch": steps_per_epoch,
                "world_size": world,
                "config": _plain(config.to_dict()),
                "history": history,
                "steps": step_log,
                "rng": rng,
                "equivision_version": __version__,
            })
        epoch_bar.set_postfix(loss=f"{means[0]:.4f}", equiv=f"{means[2]:.4f}")
    epoch_bar.close()
    return {k: list(v) for k, v in history.items()}


def _gather_rng(world: int) -> list[dict[str, Any]]:
    """Every process's global RNG state (rank order)."""
    state = get_rng_state()
    if world <= 1:
        return [state]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, state)
    return out


def _restore(
    ckpt: dict[str, Any],
    path: Path,
    method: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: PretrainConfig,
    identity: dict[str, Any],
    encoder_config: dict[str, Any],
    steps_per_epoch: int,
    rank: int,
    world: int,
) -> tuple[int, int, dict[str, list[Any]], dict[str, list[Any]]]:
    """Load a checkpoint into the method and optimizer after checking it fits."""
    where = f"checkpoint file {str(path)!r}"
    saved = {"encoder": ckpt.get("encoder_config"), "method": ckpt.get("method_name"),
             "method_kwargs": ckpt.get("method_kwargs"), "ser": ckpt.get("ser_config"),
             "config": ckpt.get("config")}
    now = {"encoder": encoder_config, "method": identity["method_name"],
           "method_kwargs": identity["method_kwargs"], "ser": identity["ser_config"],
           "config": _plain(config.to_dict())}
    diffs = config_differences(saved, now, ignore=tuple(f"config.{k}" for k in _RESUME_FREE))
    if ckpt.get("steps_per_epoch") != steps_per_epoch:
        diffs.append(f"steps_per_epoch: {ckpt.get('steps_per_epoch')!r} -> {steps_per_epoch} "
                     "(did the dataset or batch size change?)")
    if diffs:
        raise CheckpointError(
            f"cannot resume from {where}: it was trained with another configuration; "
            f"differing keys: {'; '.join(diffs)}. Build the same method / config to resume, "
            "or pretrain into another out_dir")
    try:
        method.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where} does not fit this method/optimizer: {e}") from e
    for group, fresh in zip(optimizer.param_groups, _param_groups(method)):
        group["decay"] = fresh["decay"]
    rng = ckpt["rng"]
    states = rng if isinstance(rng, list) else [rng]
    if len(states) != world:
        warnings.warn(f"{where} was written by {len(states)} process(es), now {world}; every "
                      "process restores rank 0's RNG state, so the run is not exact",
                      stacklevel=3)
    set_rng_state(states[rank] if len(states) == world else states[0])
    history = {k: list(ckpt["history"][k]) for k in EPOCH_KEYS}
    step_log = {k: list(ckpt.get("steps", {}).get(k, [])) for k in STEP_KEYS}
    epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
    old_epochs = (ckpt.get("config") or {}).get("epochs")
    if old_epochs != config.epochs:
        warnings.warn(f"{where} was started for {old_epochs} epochs, now {config.epochs}: the "
                      "learning-rate, weight-decay and teacher schedules are stretched to the "
                      "new length, so the run differs from one planned that way", stacklevel=3)
    if epoch >= config.epochs:
        warnings.warn(f"{where} has already trained {epoch} of {config.epochs} epochs; "
                      "nothing to do", stacklevel=3)
    return epoch, step, history, step_log


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
        from .vit import SSLViT

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
    from . import methods as M

    encoder, info = load_pretrained(path, map_location=map_location)
    ckpt = load_checkpoint(path, map_location, required_keys=("model",))
    ser = info["ser_config"]
    ser_obj = None if ser is None else _build(M.SERConfig, **ser)
    kwargs = dict(info["method_kwargs"] or {})
    try:
        method = M.build_method(info["method_name"], encoder, ser_obj, **kwargs)
        method.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r}: cannot rebuild method "
                              f"{info['method_name']!r} with {kwargs}: {e}") from e
    return method, info
