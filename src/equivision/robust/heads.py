"""Self-supervised heads on a frozen network and the defenses that use them.

* Rotation baseline (Shi et al. 2021, the paper's [39]): a :class:`RotationHead` on a
  named layer predicts which of the four 90° rotations was applied;
  :func:`train_rotation_head` trains it (backbone frozen) with
  :func:`equivision.training.train`; :class:`RotationDefense` purifies by minimizing the
  rotation-prediction loss of the input.
* Contrastive baseline (Mao et al. 2021, the paper's [34]): a SimCLR-style
  :class:`ContrastiveHead` trained with NT-Xent on two augmented views
  (:func:`train_contrastive_head`); :class:`ContrastiveDefense` purifies by maximizing
  the agreement of the projections of fixed views of each image.

Both defenses use the optimizer of Algorithm 1 (:class:`~.defenses.PurifierDefense`).
Heads are plain ``nn.Module``: cache them with ``head.state_dict()`` and rebuild with
``RotationHead(**head.config)`` / ``ContrastiveHead(**head.config)`` +
``load_state_dict``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..augment import HorizontalFlip, RandomCrop
from ..training import TrainConfig, train
from ..transforms import Transform, rot90
from ..utils import model_device, preserve_rng_state
from .defenses import PurifierDefense, _check_transforms, default_transforms
from .views import FeatureExtractor, view_features

__all__ = [
    "ContrastiveDefense", "ContrastiveHead", "RotationDefense", "RotationHead",
    "contrastive_agreement", "feature_channels", "nt_xent", "rotation_loss",
    "train_contrastive_head",
    "train_rotation_head",
]


class _MLPHead(nn.Module):
    """Average pooling to a ``grid x grid`` map (for maps) + ``Linear -> ReLU -> Linear``.

    A grid above 1 keeps coarse layout, which the rotation task needs (globally pooled
    conv features hardly change under rotation). Vector features ``(B, C)`` need
    ``grid = 1``.

    Shapes: features ``(B, C, h, w)`` or ``(B, C)`` -> ``(B, out_features)``.
    """

    def __init__(self, in_channels: int, out_features: int, hidden: int = 64,
                 grid: int = 2) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_features", out_features),
                        ("hidden", hidden), ("grid", grid)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.in_channels, self.out_features = in_channels, out_features
        self.hidden, self.grid = hidden, grid
        self.net = nn.Sequential(
            nn.Linear(in_channels * grid * grid, hidden), nn.ReLU(), nn.Linear(hidden, out_features)
        )

    def forward(self, f: Tensor) -> Tensor:
        """``(B, C, h, w)`` or ``(B, C)`` -> ``(B, out_features)``."""
        if f.dim() == 4 and f.shape[1] == self.in_channels:
            f = F.adaptive_avg_pool2d(f, self.grid).flatten(1)
        elif not (f.dim() == 2 and self.grid == 1 and f.shape[1] == self.in_channels):
            raise ValueError(
                f"{type(self).__name__} expects features (B, {self.in_channels}, h, w)"
                f"{f' or (B, {self.in_channels})' if self.grid == 1 else ''}, got "
                f"{tuple(f.shape)}; was it built for this layer?"
            )
        return self.net(f)


class RotationHead(_MLPHead):
    """Predicts the rotation ``k`` in {0, 1, 2, 3} (``k x 90°``) from features.

    ``config`` holds the constructor arguments: ``RotationHead(**head.config)``.
    """

    def __init__(self, in_channels: int, hidden: int = 64, grid: int = 2) -> None:
        super().__init__(in_channels, 4, hidden, grid)

    @property
    def config(self) -> dict[str, int]:
        """Constructor arguments, to rebuild the head before ``load_state_dict``."""
        return {"in_channels": self.in_channels, "hidden": self.hidden, "grid": self.grid}


class ContrastiveHead(_MLPHead):
    """SimCLR projection head: features -> ``(B, dim)`` (not normalized).

    ``config`` holds the constructor arguments: ``ContrastiveHead(**head.config)``.
    """

    def __init__(self, in_channels: int, dim: int = 32, hidden: int = 64, grid: int = 1) -> None:
        super().__init__(in_channels, dim, hidden, grid)

    @property
    def config(self) -> dict[str, int]:
        """Constructor arguments, to rebuild the head before ``load_state_dict``."""
        return {"in_channels": self.in_channels, "dim": self.out_features, "hidden": self.hidden,
                "grid": self.grid}


def feature_channels(model: nn.Module, feature_layer: str, sample: Tensor
                     ) -> tuple[int, bool]:
    """Channels ``C`` of ``feature_layer``'s output for ``sample (B, C_in, H, W)`` and
    whether that output is a spatial map."""
    model.eval()
    with torch.no_grad():
        f = FeatureExtractor(model, feature_layer)(sample)
    if f.dim() not in (2, 4):
        raise ValueError(f"layer {feature_layer!r} gives {tuple(f.shape)}; need (B, C) or "
                         "(B, C, h, w)")
    return int(f.shape[1]), f.dim() == 4


_ROTATIONS: tuple[Transform, ...] = (rot90(1), rot90(2), rot90(3))


def rotation_loss(extractor: FeatureExtractor, head: RotationHead, x: Tensor) -> Tensor:
    """Mean cross-entropy of predicting each of the 4 rotations of each image.

    ``x (B, C, S, S)`` (square) -> ``(B,)``; the 4 rotated views run in one forward pass.
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"the rotation head needs square images, got {tuple(x.shape[-2:])}")
    feats = view_features(extractor, x, _ROTATIONS, batched=True)
    losses = [
        F.cross_entropy(head(f), torch.full((x.shape[0],), k, device=x.device), reduction="none")
        for k, f in enumerate(feats)
    ]
    return torch.stack(losses, dim=1).mean(dim=1)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR) loss of two views' projections ``(B, d)`` each -> scalar.

    Each of the ``2B`` projections must pick its partner among the other ``2B - 1``.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def contrastive_agreement(
    extractor: FeatureExtractor, head: ContrastiveHead, x: Tensor,
    transforms: Sequence[Transform],
) -> Tensor:
    """Mean cosine between the projections of all pairs of views ``[x, g_1 x, ...]`` of
    each image: ``(B, C, H, W) -> (B,)``."""
    feats = view_features(extractor, x, transforms, batched=True)
    zs = [F.normalize(head(f), dim=1) for f in feats]
    cos = [(zs[i] * zs[j]).sum(dim=1) for i, j in itertools.combinations(range(len(zs)), 2)]
    return torch.stack(cos, dim=1).mean(dim=1)


# ----------------------------------------------------------------------------- training


class _FrozenBackboneHead(nn.Module):
    """``head(F(x))`` with a frozen backbone: only the head is a submodule, so
    ``parameters()``, ``train()`` and ``to()`` touch the head alone."""

    def __init__(self, extractor: FeatureExtractor, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self._extractor = extractor  # not an nn.Module: not registered

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            f = self._extractor(x)
        return self.head(f)


class _RotatedSet(Dataset):
    """Item ``4 i + k``: image ``i`` rotated by ``k x 90°``, label ``k``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return 4 * len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = _image_of(self.dataset[index // 4])
        k = index % 4
        return rot90(k).apply_map(image), k


def _image_of(item: Any) -> Tensor:
    image = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise TypeError("the dataset must yield images (C, H, W) or (image, label) pairs")
    return image


def _prepare_head(
    model: nn.Module, feature_layer: str, dataset: Dataset, head: nn.Module | None,
    build: Callable[[int, int], nn.Module], grid: int,
) -> tuple[FeatureExtractor, torch.device, nn.Module]:
    """Shared set-up of the head trainers: the frozen ``model`` in eval mode, an extractor
    of ``feature_layer``, its device, and ``head`` (or ``build(channels, pool grid)`` sized
    from one image of ``dataset``; vector layers get pool grid 1) on that device."""
    model.eval()
    extractor = FeatureExtractor(model, feature_layer)
    device = model_device(model)
    if head is None:
        sample = _image_of(dataset[0]).unsqueeze(0).to(device)
        channels, spatial = feature_channels(model, feature_layer, sample)
        head = build(channels, grid if spatial else 1)
    return extractor, device, head.to(device)


def train_rotation_head(
    model: nn.Module,
    feature_layer: str,
    dataset: Dataset,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    hidden: int = 64,
    grid: int = 2,
    seed: int = 0,
    head: RotationHead | None = None,
) -> RotationHead:
    """Train a rotation-prediction head on ``feature_layer`` of a frozen ``model``.

    Every image of ``dataset`` (items ``(C, S, S)`` or ``(image, label)``, square, in
    [0, 1]) appears in its four 90° rotations; the head learns ``k`` with cross-entropy
    (:func:`equivision.training.train`, Adam, cosine schedule, seeded with ``seed``, which
    seeds the global RNGs). The model is put in eval mode and not changed. A new head
    (``head=None``) pools maps to ``grid x grid`` (1 for vector layers).

    Returns:
        The trained head (``head.history``: the training history).
    """
    extractor, device, head = _prepare_head(
        model, feature_layer, dataset, head, lambda c, pool: RotationHead(c, hidden, pool),
        grid)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adam",
                         weight_decay=0.0, seed=seed, device=str(device))
    history = train(_FrozenBackboneHead(extractor, head), _RotatedSet(dataset), config=config,
                    progress=False)
    head.history = history  # type: ignore[attr-defined]
    head.eval()
    return head


def train_contrastive_head(
    model: nn.Module,
    feature_layer: str,
    dataset: Dataset,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    dim: int = 32,
    hidden: int = 64,
    temperature: float = 0.5,
    crop: int = 2,
    grid: int = 1,
    seed: int = 0,
    head: ContrastiveHead | None = None,
) -> ContrastiveHead:
    """Train a SimCLR projection head on ``feature_layer`` of a frozen ``model`` with
    NT-Xent.

    The two views of each image are random crops (``crop`` pixels of zero padding, a
    random shift) with random horizontal flips and a random brightness shift in
    [-0.1, 0.1], clipped to [0, 1] (:mod:`equivision.augment`). Randomness is seeded with
    ``seed`` and the global RNG states are restored afterwards. A new head pools maps to
    ``grid x grid`` (1: global pooling, SimCLR's choice).

    Returns:
        The trained head (``head.history``: mean loss per epoch).
    """
    extractor, device, head = _prepare_head(
        model, feature_layer, dataset, head,
        lambda c, pool: ContrastiveHead(c, dim, hidden, pool), grid)
    head.train()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    shift, flip = RandomCrop(crop), HorizontalFlip()

    def augment(x: Tensor) -> Tensor:
        bright = (torch.rand(x.shape[0], 1, 1, 1) * 0.2 - 0.1).to(x.device)
        return torch.clamp(flip(shift(x)) + bright, 0.0, 1.0)

    history: list[float] = []
    with preserve_rng_state():
        torch.manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=False,
                            generator=torch.Generator().manual_seed(seed))
        for _ in range(epochs):
            total, count = 0.0, 0
            for batch in loader:
                x = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
                if x.shape[0] < 2:
                    continue
                with torch.no_grad():
                    f1, f2 = extractor(augment(x)), extractor(augment(x))
                loss = nt_xent(head(f1), head(f2), temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * x.shape[0]
                count += x.shape[0]
            history.append(total / max(count, 1))
    head.history = history  # type: ignore[attr-defined]
    head.eval()
    return head


# ----------------------------------------------------------------------------- defenses


class RotationDefense(PurifierDefense):
    """Rotation baseline: purify by minimizing the rotation-prediction loss
    (:func:`rotation_loss`) of a trained :class:`RotationHead` on ``feature_layer``.

    Args:
        model: frozen classifier or segmenter, square images in [0, 1].
        head: a trained :class:`RotationHead` for ``feature_layer``.
        feature_layer: the layer the head reads (a submodule name or ``"logits"``).
        **kwargs: optimizer settings of :class:`~.defenses.PurifierDefense`.
    """

    def __init__(self, model: nn.Module, head: RotationHead, feature_layer: str,
                 **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if not isinstance(head, RotationHead):
            raise TypeError(f"head must be a RotationHead, got {type(head).__name__}")
        self.head = head.eval()
        self.feature_layer = feature_layer
        self.extractor = FeatureExtractor(model, feature_layer)

    def train(self, mode: bool = True) -> RotationDefense:
        """The model and the head stay in eval mode."""
        super().train(mode)
        self.head.eval()
        return self

    def _loss(self, x: Tensor) -> Tensor:
        return rotation_loss(self.extractor, self.head, x)


class ContrastiveDefense(PurifierDefense):
    """Contrastive baseline: purify by maximizing the agreement (mean pairwise cosine)
    of a trained :class:`ContrastiveHead`'s projections of the views ``[x, g_1 x, ...]``.

    Only the views of the same image are compared (no negatives from the batch), so an
    image's purification does not depend on the other images; the loss is
    ``-agreement`` per image.

    Args:
        model: frozen classifier or segmenter, images in [0, 1].
        head: a trained :class:`ContrastiveHead` for ``feature_layer``.
        feature_layer: the layer the head reads.
        transforms: the views' transformations (default
            :func:`~.defenses.default_transforms`).
        **kwargs: optimizer settings of :class:`~.defenses.PurifierDefense`.
    """

    def __init__(self, model: nn.Module, head: ContrastiveHead, feature_layer: str,
                 transforms: Sequence[Transform] | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if not isinstance(head, ContrastiveHead):
            raise TypeError(f"head must be a ContrastiveHead, got {type(head).__name__}")
        self.head = head.eval()
        self.feature_layer = feature_layer
        self.extractor = FeatureExtractor(model, feature_layer)
        self.transforms = _check_transforms(transforms)

    def train(self, mode: bool = True) -> ContrastiveDefense:
        """The model and the head stay in eval mode."""
        super().train(mode)
        self.head.eval()
        return self

    def _loss(self, x: Tensor) -> Tensor:
        if self.transforms is None:
            self.transforms = default_transforms(x.shape[1])
        return -contrastive_agreement(self.extractor, self.head, x, self.transforms)
