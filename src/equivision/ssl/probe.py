"""Evaluating frozen self-supervised encoders: probes, equivariance scores, robustness.

All functions work on an encoder with the :class:`~equivision.ssl.vit.SSLViT` interface
(``encoder(x, n_last=..., all_tokens=...)`` returning ``cls``, ``last_cls`` and
``token_maps``) or directly on feature tensors:

* :func:`extract_features` -- concatenated [CLS] of the last ``n_last`` blocks ``(N, n*D)``;
* :func:`linear_probe`, :func:`mlp_probe` -- classifiers trained on fixed features;
* :func:`knn_probe` -- weighted k-NN (k=20, T=0.07, cosine) as in DINO;
* :func:`equivariance_scores` -- per-block centred cosine between ``f(g x)`` and ``g f(x)``
  (:func:`centred_cosine`);
* :func:`transformation_prediction` -- per-block linear probes predicting the applied
  rotation (4 classes) or flip (2 classes) from pooled tokens;
* :func:`corruption_robustness` -- accuracy of a linear probe under generated corruptions;
* :func:`run_probes` -- any subset of the above, as one JSON-serializable dict, with
  (``baselines=True``) :func:`probe_baselines`: the same linear and k-NN probes on raw
  pixels and on a random-init twin of the encoder, and the twin's equivariance scores.

:func:`fit_images` / :func:`fit_dataset` adapt other datasets (e.g. 1x28x28 digits) to the
encoder's input size and channels. Every function restores the encoder's train/eval mode
and leaves the global RNG untouched (its randomness comes from seeded generators).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import ImageDataset
from ..measure.compare import Comparator, per_image_cosine
from ..measure.stats import PairStats, per_image
from ..training.distributed import dist_info
from ..transforms import Layout, Transform, as_transforms, hflip, rot90
from ..transforms.affine import Scale
from ..transforms.layout import as_stride
from ..utils import model_device, resolve_device
from .baselines import pixel_features, random_init_like
from .corruptions import CORRUPTIONS, SEVERITIES, corruption_accuracy

__all__ = [
    "PROBES",
    "fit_images",
    "fit_dataset",
    "extract_features",
    "linear_probe",
    "mlp_probe",
    "knn_probe",
    "KNNMonitor",
    "centred_cosine",
    "equivariance_scores",
    "transformation_prediction",
    "corruption_robustness",
    "probe_baselines",
    "run_probes",
]

#: Names accepted by :func:`run_probes`'s ``which``.
PROBES = ("linear", "knn", "mlp", "equivariance", "transform_prediction", "corruptions")


# ----------------------------------------------------------------------------- data adapter


def fit_images(images: Tensor, size: int, channels: int = 3) -> Tensor:
    """Fit ``images (N, C, H, W)`` in ``[0, 1]`` to ``(N, channels, size, size)``.

    Smaller images are zero-padded centrally (e.g. 28 px digits -> 32 px), larger ones
    resized (bilinear, antialiased; non-square ones first padded to a square). One channel
    is repeated to ``channels``; three channels go to one by their ITU-R 601 luma.

    Raises:
        ValueError: not a 4-d floating tensor, or a channel conversion other than
            1 -> C, 3 -> 1 or C -> C.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            "images must be a floating tensor (N, C, H, W), got "
            f"{getattr(images, 'shape', type(images).__name__)}"
        )
    n, c, h, w = images.shape
    x = images
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top))
        h = w = side
    if h < size:
        before = (size - h) // 2
        x = F.pad(x, (before, size - h - before, before, size - h - before))
    elif h > size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0.0, 1.0)
    if c == channels:
        return x
    if c == 1:
        return x.expand(n, channels, size, size).contiguous()
    if c == 3 and channels == 1:
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
        return (x * luma.view(1, 3, 1, 1)).sum(1, keepdim=True).clamp(0.0, 1.0)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def fit_dataset(dataset: Any, size: int, channels: int = 3) -> ImageDataset:
    """An :class:`~equivision.data.ImageDataset` with the images of ``dataset`` fitted by
    :func:`fit_images` (e.g. ``fit_dataset(get_dataset("digits"), 32)`` gives 3x32x32)."""
    images, labels = _tensors(dataset)
    classes = getattr(dataset, "classes", None) or [str(k) for k in range(int(labels.max()) + 1)]
    name = getattr(dataset, "name", "")
    return ImageDataset(fit_images(images, size, channels), labels, classes,
                        name=f"{name}@{channels}x{size}" if name else "")


def _tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    """``(images (N, C, H, W), labels (N,))`` of an ImageDataset or a map-style dataset."""
    images = getattr(dataset, "images", None)
    labels = getattr(dataset, "labels", None)
    if isinstance(images, Tensor) and isinstance(labels, Tensor):
        return images, labels.long()
    if not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ValueError("the dataset must be a non-empty map-style dataset of (image, label)")
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(list(xs)), torch.as_tensor([int(y) for y in ys])


def _prepared(encoder: nn.Module, dataset: Any) -> tuple[Tensor, Tensor]:
    """The dataset's tensors fitted to the encoder's input size and channels."""
    images, labels = _tensors(dataset)
    size = getattr(encoder, "image_size", images.shape[-1])
    channels = getattr(encoder, "in_channels", images.shape[1])
    if images.shape[1:] != (channels, size, size):
        images = fit_images(images, size, channels)
    return images, labels


class _Frozen:
    """Context: encoder in eval mode on ``device`` with grads off; restores its mode."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder

    def __enter__(self) -> nn.Module:
        self.was_training = self.encoder.training
        self.grad = torch.is_grad_enabled()
        self.encoder.eval()
        torch.set_grad_enabled(False)
        return self.encoder

    def __exit__(self, *exc: object) -> None:
        torch.set_grad_enabled(self.grad)
        self.encoder.train(self.was_training)


# ----------------------------------------------------------------------------- features


def extract_features(
    encoder: nn.Module,
    dataset: Any,
    n_last: int = 4,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Frozen features for probing: the [CLS] tokens of the last ``n_last`` blocks.

    ``n_last`` is capped at the number of blocks that carry a [CLS] token
    (``depth - cls_layer``); with ``n_last=0`` only the final [CLS] is used.

    Returns:
        ``features (N, n * D)`` float32 on the CPU and ``labels (N,)`` int64.
    """
    dev = model_device(encoder) if device is None else resolve_device(device)
    encoder.to(dev)
    images, labels = _prepared(encoder, dataset)
    cap = getattr(encoder, "depth", n_last) - getattr(encoder, "cls_layer", 0)
    n = max(0, min(n_last, cap))
    feats = []
    with _Frozen(encoder):
        for i in range(0, len(images), batch_size):
            out = encoder(images[i : i + batch_size].to(dev), n_last=n)
            f = torch.cat(out.last_cls, dim=1) if n else out.cls
            feats.append(f.float().cpu())
    return torch.cat(feats), labels


# ----------------------------------------------------------------------------- classifiers


def _check_features(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> None:
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"features must be (N, F) with the same F, got {tuple(train_x.shape)} and "
            f"{tuple(test_x.shape)}"
        )
    if train_y.shape != (len(train_x),) or test_y.shape != (len(test_x),):
        raise ValueError("labels must be (N,) matching the features")
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("need at least one training and one test feature vector")


def _topk(logits: Tensor, labels: Tensor) -> dict[str, float]:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels[:, None]
    return {"top1": float(hit[:, 0].float().mean()), "top5": float(hit.any(1).float().mean())}


def _fit(
    head: nn.Module,
    train_x: Tensor,
    train_y: Tensor,
    steps: int,
    lr: float,
    weight_decay: float,
    batch_size: int | None,
    seed: int,
) -> nn.Module:
    """Train ``head`` with AdamW and a cosine schedule; full batch when ``batch_size`` is None."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(train_x)
    head.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))
        if batch_size is None or batch_size >= n:
            x, y = train_x, train_y
        else:
            idx = torch.randint(0, n, (batch_size,), generator=g)
            x, y = train_x[idx], train_y[idx]
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


class _Standardize(nn.Module):
    """Fixed per-feature standardisation by training-set statistics (an affine-free BN)."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", x.mean(0))
        self.register_buffer("std", x.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _classifier(
    kind: str,
    train_x: Tensor,
    train_y: Tensor,
    num_classes: int,
    hidden: int,
    steps: int,
    lr: float,
    weight_decay: float,
    batch_size: int | None,
    seed: int,
) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        f = train_x.shape[1]
        if kind == "linear":
            layers: list[nn.Module] = [nn.Linear(f, num_classes)]
        else:  # a 3-layer MLP (Garrido et al. 2023)
            layers = [nn.Linear(f, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                      nn.Linear(hidden, num_classes)]
        head = nn.Sequential(_Standardize(train_x), *layers).to(train_x.device)
    with torch.enable_grad():
        return _fit(head, train_x, train_y, steps, lr, weight_decay, batch_size, seed)


def _num_classes(*labels: Tensor) -> int:
    return int(max(int(y.max()) for y in labels)) + 1


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    seed: int = 0,
    return_model: bool = False,
) -> dict[str, Any]:
    """Train a linear classifier on standardized features ``(N, F)``; test top-1/top-5.

    AdamW with cosine decay for ``steps`` full-batch (``batch_size=None``) or mini-batch
    steps. Returns ``{"top1", "top5", "train_top1"}`` (fractions in ``[0, 1]``) and, with
    ``return_model=True``, the trained head under ``"model"`` (not JSON-serializable).
    """
    _check_features(train_x, train_y, test_x, test_y)
    k = _num_classes(train_y, test_y)
    head = _classifier("linear", train_x.float(), train_y, k, 0, steps, lr, weight_decay,
                       batch_size, seed)
    with torch.no_grad():
        out = {**_topk(head(test_x.float()), test_y),
               "train_top1": _topk(head(train_x.float()), train_y)["top1"]}
    if return_model:
        out["model"] = head
    return out


def mlp_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    hidden: int = 512,
    steps: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Like :func:`linear_probe` with a 3-layer ReLU MLP (``hidden`` units) as the head."""
    _check_features(train_x, train_y, test_x, test_y)
    k = _num_classes(train_y, test_y)
    head = _classifier("mlp", train_x.float(), train_y, k, hidden, steps, lr, weight_decay,
                       batch_size, seed)
    with torch.no_grad():
        return {**_topk(head(test_x.float()), test_y),
                "train_top1": _topk(head(train_x.float()), train_y)["top1"]}


@torch.no_grad()
def knn_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[str, float]:
    """Weighted k-NN classification on cosine similarity, as in DINO.

    Each test vector's ``k`` most similar training vectors vote for their class with weight
    ``exp(similarity / temperature)``; ``k`` is capped at the training-set size.

    Returns:
        ``{"top1", "top5"}`` in ``[0, 1]``.
    """
    _check_features(train_x, train_y, test_x, test_y)
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    classes = _num_classes(train_y, test_y)
    k = min(k, len(train_x))
    train_n = F.normalize(train_x.float(), dim=1)
    hits1 = hits5 = 0
    for i in range(0, len(test_x), chunk):
        q = F.normalize(test_x[i : i + chunk].float(), dim=1)
        sim, idx = (q @ train_n.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(q), classes)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        scores = _topk(votes, test_y[i : i + chunk])
        hits1 += scores["top1"] * len(q)
        hits5 += scores["top5"] * len(q)
    return {"top1": hits1 / len(test_x), "top5": hits5 / len(test_x)}


class KNNMonitor:
    """Online k-NN monitor for pretraining: the weighted k-NN top-1 (:func:`knn_probe`,
    final [CLS]) of the encoder on a held-out slice, every ``every`` epochs or, with
    ``every_steps``, every ``every_steps`` optimiser steps.

    A callback for :func:`equivision.training.run` (``RunOptions(callbacks=[monitor])``,
    or ``pretrain(callbacks=[monitor])``): ``on_epoch_end(epoch, model, history)`` and
    ``on_step_end(step, model)`` (``model`` is the SSL method, its ``backbone`` the
    encoder). Results accumulate in :attr:`history` as ``{"epoch": [...], "step": [...],
    "knn_top1": [...]}`` (``"epoch"`` filled when counting epochs, ``"step"`` when
    counting steps). Under torchrun only rank 0 measures (the others skip).

    Args:
        train, test: labelled datasets (the memory bank and the held-out queries).
        every: run after epochs ``every, 2·every, ...`` (1-based, as the runner counts).
        k, n_last: neighbours and [CLS] layers (see :func:`extract_features`).
        every_steps: run after steps ``every_steps, 2·every_steps, ...`` instead (1-based,
            counted over the whole run); ``every`` is then ignored.
    """

    def __init__(self, train: Any, test: Any, every: int = 1, k: int = 20,
                 n_last: int = 0, every_steps: int | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be None or >= 1, got {every_steps}")
        self.train, self.test, self.every, self.k, self.n_last = train, test, every, k, n_last
        self.every_steps = every_steps
        self.history: dict[str, list[float]] = {"epoch": [], "step": [], "knn_top1": []}

    def measure(self, encoder: nn.Module) -> float:
        """k-NN top-1 of ``encoder`` now (its train / eval mode is restored)."""
        tr = extract_features(encoder, self.train, n_last=self.n_last)
        te = extract_features(encoder, self.test, n_last=self.n_last)
        return knn_probe(*tr, *te, k=min(self.k, len(tr[0])))["top1"]

    def _record(self, key: str, count: int, model: nn.Module) -> None:
        if dist_info()[0] != 0:
            return
        self.history[key].append(count)
        self.history["knn_top1"].append(self.measure(getattr(model, "backbone", model)))

    def on_epoch_end(self, epoch: int, model: nn.Module, history: dict) -> None:
        """Measure after (1-based) ``epoch`` when it is a multiple of ``every`` (not when
        counting steps)."""
        if self.every_steps is None and epoch % self.every == 0:
            self._record("epoch", epoch, model)

    def on_step_end(self, step: int, model: nn.Module) -> None:
        """Measure after (1-based) ``step`` when it is a multiple of ``every_steps``."""
        if self.every_steps is not None and step % self.every_steps == 0:
            self._record("step", step, model)


# ----------------------------------------------------------------------------- equivariance


def _default_transforms(grid: tuple[int, int]) -> dict[str, Transform]:
    """rot90, hflip and a zoom by ``(h + 2) / h`` for an ``h x h`` token grid: the scaled
    image spans ``h + 2`` patches, so its edges fall on patch boundaries (as in T_eq)."""
    h = grid[0]
    return {"rot90": rot90(1), "hflip": hflip(), "scale": Scale((h + 2) / h)}


def centred_cosine(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-image centred cosine of two maps ``a, b (B, C, h, w)`` over the valid positions
    ``mask (h, w)``: each image's per-channel spatial mean is subtracted first, then one
    cosine over the ``C x n_valid`` entries; ``(B,)``.

    Centring removes what every position shares (a global cosine of raw token maps is
    dominated by it and scores a wrong action almost as high as the right one)."""
    ra, rb = per_image(a, mask).flatten(2), per_image(b, mask).flatten(2)  # (B, C, n)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return per_image_cosine(ra, rb)


@torch.no_grad()
def equivariance_scores(
    encoder: nn.Module,
    dataset: Any,
    transforms: dict[str, Transform] | Sequence[Transform] | str | None = None,
    batch_size: int = 128,
    max_images: int | None = 512,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Per-block equivariance score ``cos(f_l(g x), g·f_l(x))`` (SER appendix A.2).

    For every block ``l`` (``token_maps`` of the encoder, 1-based), the patch-token maps of
    ``g x`` and of ``x`` are compared after ``g`` acts on the latter's map (rot90 and flips
    permute tokens exactly; scaling resamples the map bilinearly), aligned and masked by the
    comparison core (:class:`~equivision.measure.compare.Comparator`; positions filled with
    zeros by the action are left out). ``"centred"`` is the score to read: the mean over
    images of :func:`centred_cosine` (per-image, per-channel spatial mean removed), which
    tells the right action from a wrong one. ``"scores"`` keeps the mean per-image global
    cosine over the ``D x h x w`` entries (accumulated with
    :class:`~equivision.measure.stats.PairStats`): positions share most of a token map, so
    it is near 1 for the right and a wrong action alike and is kept for comparison only.
    ``"cls"`` holds the cosine between the final [CLS] of ``x`` and of ``g x`` (its action
    is the identity, so this is its invariance).

    Args:
        transforms: name -> Transform, a list of transformations or a spec string (named
            by ``Transform.name``); default rot90, hflip and a whole-patch zoom
            ``Scale((h + 2) / h)`` for an ``h x h`` token grid.
        max_images: use at most this many images (None: all).

    Returns:
        ``{"layers": [1..depth], "centred": {name: [score per block]}, "scores": {name:
        [global cosine per block]}, "cls": {name: score}, "n_images": N}``.
    """
    dev = model_device(encoder) if device is None else resolve_device(device)
    encoder.to(dev)
    images, _ = _prepared(encoder, dataset)
    if max_images is not None:
        images = images[:max_images]
    grid = tuple(getattr(encoder, "grid", images.shape[-2:]))
    patch = getattr(encoder, "patch_size", 1)
    if transforms is not None and not isinstance(transforms, dict):
        transforms = {t.name: t for t in as_transforms(transforms)}
    transforms = transforms or _default_transforms(grid)  # type: ignore[arg-type]
    stats: dict[str, list[PairStats]] = {}
    centred: dict[str, list[float]] = {}
    cls_stats: dict[str, PairStats] = {}
    compare = Comparator()
    layout = Layout("map", as_stride(patch))
    with _Frozen(encoder):
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(dev)
            base = encoder(x, all_tokens=True)
            for name, g in transforms.items():
                moved = encoder(g.apply_image(x), all_tokens=True)
                maps = base.token_maps or []
                if name not in stats:
                    stats[name] = [PairStats(m.shape[1]) for m in maps]
                    cls_stats[name] = PairStats(base.cls.shape[1])
                    centred[name] = [0.0] * len(maps)
                for j, (st, fx, fgx) in enumerate(zip(stats[name], maps, moved.token_maps or [])):
                    compare.accumulate(st, fgx.float(), fx.float(), g, layout)
                    pair = compare.compare(fgx.float(), fx.float(), g, layout)
                    centred[name][j] += float(centred_cosine(pair.a, pair.b, pair.mask).sum())
                compare.accumulate(cls_stats[name], moved.cls.float(), base.cls.float(), g,
                                   Layout("vector"))
    depth = len(next(iter(stats.values()), []))
    return {
        "layers": list(range(1, depth + 1)),
        "centred": {n: [c / max(1, len(images)) for c in v] for n, v in centred.items()},
        "scores": {n: [s.cos_sum / max(1.0, s.images) for s in v] for n, v in stats.items()},
        "cls": {n: s.cos_sum / max(1.0, s.images) for n, s in cls_stats.items()},
        "n_images": len(images),
    }


@torch.no_grad()
def _pooled_per_layer(
    encoder: nn.Module, images: Tensor, batch_size: int, dev: torch.device
) -> list[Tensor]:
    """Mean-pooled patch tokens of every block, ``depth`` tensors ``(N, D)``, plus the final
    [CLS] as the last entry."""
    per: list[list[Tensor]] = []
    for i in range(0, len(images), batch_size):
        out = encoder(images[i : i + batch_size].to(dev), all_tokens=True)
        feats = [m.float().mean(dim=(2, 3)).cpu() for m in out.token_maps or []]
        feats.append(out.cls.float().cpu())
        if not per:
            per = [[] for _ in feats]
        for bucket, f in zip(per, feats):
            bucket.append(f)
    return [torch.cat(b) for b in per]


def _transformed(images: Tensor, task: str, seed: int) -> tuple[Tensor, Tensor]:
    """Each image under a random rotation (4 classes) or flip (2 classes); with labels."""
    g = torch.Generator().manual_seed(seed)
    classes = 4 if task == "rotation" else 2
    y = torch.randint(0, classes, (len(images),), generator=g)
    out = images.clone()
    for c in range(1, classes):
        sel = y == c
        if bool(sel.any()):
            t = rot90(c) if task == "rotation" else hflip()
            out[sel] = t.apply_image(images[sel])
    return out, y


def transformation_prediction(
    encoder: nn.Module,
    train_set: Any,
    test_set: Any,
    tasks: Sequence[str] = ("rotation", "flip"),
    steps: int = 200,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Per-layer accuracy of linear probes that predict the transformation applied.

    Every image gets one random rotation by ``k * 90°`` (``"rotation"``, 4 classes) or a
    random horizontal flip or none (``"flip"``, 2 classes); a linear classifier on each
    block's mean-pooled patch tokens (and on the final [CLS], ``"cls"``) learns to predict it
    on ``train_set`` and is tested on ``test_set`` (SER Table 7, following Garrido et al.).

    Returns:
        ``{"layers": [1..depth], task: {"per_layer": [acc per block], "cls": acc,
        "chance": 1/classes}}``.
    """
    bad = [t for t in tasks if t not in ("rotation", "flip")]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; choose from 'rotation', 'flip'")
    dev = model_device(encoder) if device is None else resolve_device(device)
    encoder.to(dev)
    tr_images, _ = _prepared(encoder, train_set)
    te_images, _ = _prepared(encoder, test_set)
    result: dict[str, Any] = {"layers": list(range(1, getattr(encoder, "depth", 0) + 1))}
    with _Frozen(encoder):
        for t_i, task in enumerate(tasks):
            xtr, ytr = _transformed(tr_images, task, seed + 2 * t_i)
            xte, yte = _transformed(te_images, task, seed + 2 * t_i + 1)
            ftr = _pooled_per_layer(encoder, xtr, batch_size, dev)
            fte = _pooled_per_layer(encoder, xte, batch_size, dev)
            accs = [linear_probe(a, ytr, b, yte, steps=steps, seed=seed)["top1"]
                    for a, b in zip(ftr, fte)]
            result[task] = {"per_layer": accs[:-1], "cls": accs[-1],
                            "chance": 1.0 / (4 if task == "rotation" else 2)}
    return result


def corruption_robustness(
    encoder: nn.Module,
    train_set: Any,
    test_set: Any,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    n_last: int = 4,
    steps: int = 300,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Accuracy under generated corruptions of a linear probe trained on clean features.

    The probe is :func:`linear_probe` on :func:`extract_features` of ``train_set``; the test
    images are corrupted with :func:`~equivision.ssl.corruptions.corrupt` (after fitting
    them to the encoder's input) and classified through the frozen encoder.

    Returns:
        :func:`~equivision.ssl.corruptions.corruption_accuracy`'s dict.
    """
    dev = model_device(encoder) if device is None else resolve_device(device)
    encoder.to(dev)
    ftr, ytr = extract_features(encoder, train_set, n_last, batch_size, dev)
    head = linear_probe(ftr, ytr, ftr[:1], ytr[:1], steps=steps, seed=seed,
                        return_model=True)["model"]
    images, labels = _prepared(encoder, test_set)
    cap = getattr(encoder, "depth", n_last) - getattr(encoder, "cls_layer", 0)
    n = max(0, min(n_last, cap))

    def classify(x: Tensor) -> Tensor:
        out = encoder(x.to(dev), n_last=n)
        f = torch.cat(out.last_cls, dim=1) if n else out.cls
        return head(f.float().cpu())

    with _Frozen(encoder):
        return corruption_accuracy(classify, _Pair(images, labels), corruptions, severities,
                                   batch_size, seed)


class _Pair:
    """Minimal dataset view with ``images`` and ``labels`` attributes."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------- baselines


def _classify(feats: tuple[Tensor, Tensor, Tensor, Tensor], linear: dict[str, Any],
              knn: dict[str, Any]) -> dict[str, Any]:
    """Linear and k-NN probes on ``(train_x, train_y, test_x, test_y)``."""
    return {"linear": linear_probe(*feats, **linear), "knn": knn_probe(*feats, **knn)}


def probe_baselines(
    encoder: nn.Module,
    train_set: Any,
    test_set: Any,
    device: str | torch.device | None = "cpu",
    options: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The baselines of a probe report: linear and k-NN probes on raw pixels (the images
    fitted to ``encoder``'s input, flattened) and on a random-init twin of ``encoder``
    (:func:`~equivision.ssl.baselines.random_init_like` with ``seed``), plus the twin's
    centred equivariance scores per block (:func:`equivariance_scores`).

    Args:
        options: as in :func:`run_probes`; ``"linear"``, ``"knn"``, ``"features"`` and
            ``"equivariance"`` are used, so the baselines run with the trained encoder's
            settings.

    Returns:
        ``{"raw_pixels": {"linear": ..., "knn": ...}, "random_init": {"linear": ...,
        "knn": ..., "equivariance": {"layers": [...], "centred": {name: [per block]}}}}``.
    """
    options = options or {}
    dev = resolve_device(device)
    lin, knn, f_opts = (options.get(k, {}) for k in ("linear", "knn", "features"))
    tr_images, ytr = _prepared(encoder, train_set)
    te_images, yte = _prepared(encoder, test_set)
    pixels = (pixel_features(tr_images), ytr, pixel_features(te_images), yte)
    twin = random_init_like(encoder, seed)
    feats = (*extract_features(twin, train_set, device=dev, **f_opts),
             *extract_features(twin, test_set, device=dev, **f_opts))
    random_init = _classify(feats, lin, knn)
    eq = equivariance_scores(twin, test_set, device=dev, **options.get("equivariance", {}))
    random_init["equivariance"] = {"layers": eq["layers"], "centred": eq["centred"]}
    return {"raw_pixels": _classify(pixels, lin, knn), "random_init": random_init}


# ----------------------------------------------------------------------------- all at once


def run_probes(
    encoder: nn.Module,
    train_set: Any,
    test_set: Any,
    which: Sequence[str] = ("linear", "knn"),
    device: str | torch.device | None = "cpu",
    options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
    baselines: bool = False,
) -> dict[str, Any]:
    """Run the chosen probes of a frozen encoder; returns a JSON-serializable dict.

    Args:
        encoder: an :class:`~equivision.ssl.vit.SSLViT` (e.g. ``method.backbone`` or the
            encoder from :func:`~equivision.ssl.pretrain.load_pretrained`).
        train_set, test_set: labelled datasets (``ImageDataset`` or ``(image, label)``
            map-style); images are fitted to the encoder's input by :func:`fit_images`.
        which: names from :data:`PROBES`.
        device: where the encoder runs (``"auto"``, ``"cpu"``, ``"cuda"`` ...).
        options: per-probe keyword arguments, e.g. ``{"linear": {"steps": 500},
            "knn": {"k": 10}, "corruptions": {"severities": [1, 3, 5]}}``.
        progress: optional callback receiving each probe's name before it runs.
        baselines: also run :func:`probe_baselines` (raw pixels and a random-init twin of
            the encoder: linear, k-NN and the twin's centred equivariance), under
            ``"baselines"``.

    Returns:
        ``{name: result}`` for every requested probe (and ``"baselines"``); ``"linear"``,
        ``"knn"``, ``"mlp"`` share one feature extraction (``n_last`` from
        ``options["features"]``, default 4).

    Raises:
        ValueError: an unknown probe name or options for a probe not requested.
    """
    bad = [w for w in which if w not in PROBES]
    if bad:
        raise ValueError(f"unknown probe(s) {bad}; choose from {', '.join(PROBES)}")
    options = dict(options or {})
    extra = [k for k in options if k not in PROBES and k != "features"]
    if extra:
        raise ValueError(f"options for unknown probe(s) {extra}; keys must be in {PROBES} "
                         "or 'features'")
    dev = resolve_device(device)
    encoder.to(dev)
    results: dict[str, Any] = {}
    feats: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    f_opts = options.get("features", {})
    for name in which:
        if progress is not None:
            progress(name)
        opts = options.get(name, {})
        if name in ("linear", "knn", "mlp"):
            if feats is None:
                ftr, ytr = extract_features(encoder, train_set, device=dev, **f_opts)
                fte, yte = extract_features(encoder, test_set, device=dev, **f_opts)
                feats = (ftr, ytr, fte, yte)
            fn = {"linear": linear_probe, "knn": knn_probe, "mlp": mlp_probe}[name]
            results[name] = fn(*feats, **opts)
        elif name == "equivariance":
            results[name] = equivariance_scores(encoder, test_set, device=dev, **opts)
        elif name == "transform_prediction":
            results[name] = transformation_prediction(encoder, train_set, test_set,
                                                      device=dev, **opts)
        else:
            results[name] = corruption_robustness(encoder, train_set, test_set, device=dev,
                                                  **opts)
    if baselines:
        if progress is not None:
            progress("baselines")
        results["baselines"] = probe_baselines(encoder, train_set, test_set, dev, options)
    return results
