"""p4 / p4m group-equivariant networks and their plain counterparts.

* ``z2cnn`` / ``p4cnn``: the 7-layer Z2CNN and P4CNN of Cohen & Welling (2016) as used by
  Edixhoven et al. (2023), in that paper's layout by default: each convolution followed
  by ReLU and then batch norm, dropout 0.3 after layers 1-5 only (``order="relu-bn"``,
  ``dropout_layers=5``; ``order="bn-relu", dropout_layers=7`` is the layout the first
  runs of issue 13 used, and ``cnn7``'s default). ``z2cnn`` is
  :class:`~equivision.models.cnn.CNN7`; P4CNN has ``int(20 / sqrt(G))`` channels so that
  both have about the same number of parameters. Exact at 28x28, not at 27x27 or 29x29
  (odd size before the 2x2 max pool).
* ``resnet44`` / ``p4resnet44``: CIFAR-style ResNet (6n+2 layers, widths 16/32/64, 1x1
  stride-2 projection shortcuts with batch norm); p4 widths divided by sqrt(G). Exact at
  33x33, not at 32x32.
* ``resnet18`` / ``p4resnet18``: ImageNet-style ResNet-18 (7x7 stride-2 stem, 3x3 stride-2
  max pool, widths 64..512); p4 widths divided by sqrt(G). Exact at 225x225, not 224x224.

Every model lists its measurement points in ``equivision_layers``: each block's output, the
global pooling and the classifier. The group models return group feature maps
``(B, C, G, H, W)`` at every block, which :mod:`equivision.measure` acts on with
``Transform.apply_group_map``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..gcnn.layers import GroupConv2d, group_order
from ..gcnn.norm_pool import GroupBatchNorm2d, GroupGlobalPool, GroupMaxPool2d
from .cnn import (
    CNN7,
    GlobalAvgPool,
    _check_dropout_layers,
    _check_input,
    _check_int,
    _check_order,
    _check_prob,
    seven_layer_features,
)
from .registry import register_legacy_arguments, register_model

__all__ = ["BasicBlock", "Ops", "P4CNN", "ResNet", "p4cnn", "p4resnet18", "p4resnet44",
           "resnet18", "resnet44", "z2cnn"]


@dataclass(frozen=True)
class Ops:
    """Layer factory: plain layers (``group=None``) or p4 / p4m group layers.

    ``conv(..., lifting=True)`` is the first convolution of a group network (images in).
    """

    group: str | None = None

    @property
    def size(self) -> int:
        """G: 1 for plain networks, 4 for p4, 8 for p4m."""
        return 1 if self.group is None else group_order(self.group)

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0,
             bias: bool = True, lifting: bool = False) -> nn.Module:
        """``nn.Conv2d`` (He init) or :class:`GroupConv2d`."""
        if self.group is None:
            conv = nn.Conv2d(cin, cout, k, stride, padding, bias=bias)
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            return conv
        return GroupConv2d(cin, cout, k, stride, padding, bias=bias, group=self.group,
                           in_group=None if lifting else self.group)

    def bn(self, c: int) -> nn.Module:
        return nn.BatchNorm2d(c) if self.group is None else GroupBatchNorm2d(c, self.group)

    def maxpool(self, k: int, stride: int, padding: int = 0) -> nn.Module:
        if self.group is None:
            return nn.MaxPool2d(k, stride, padding)
        return GroupMaxPool2d(k, stride, padding)

    def global_pool(self) -> nn.Module:
        """Global average pooling; for group maps coset max pooling first (invariant)."""
        return GlobalAvgPool() if self.group is None else GroupGlobalPool("max")

    def channels(self, base: int, width: float) -> int:
        """``base * width / sqrt(G)`` rounded, at least 1 (keeps parameters comparable)."""
        return max(1, int(round(base * width / math.sqrt(self.size))))


def _check_group(model: str, group: str) -> str:
    if group not in ("p4", "p4m"):
        raise ValueError(f"{model}: group must be 'p4' or 'p4m', got {group!r}")
    return group


def _check_width(model: str, width: object) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"{model}: width must be a positive number, got {width!r}")
    return float(width)


def _min_size(padding: int) -> int:
    """Smallest input side for which every layer of the 7-layer CNN has output >= 1."""

    def fits(size: int) -> bool:
        for i in range(1, 8):
            size += 2 * padding - (4 if i == 7 else 3) + 1
            if size < 1 or (i == 2 and size < 2):
                return False
            size = size // 2 if i == 2 else size
        return True

    size = 1
    while not fits(size):
        size += 1
    return size


# ---- 7-layer P4CNN -------------------------------------------------------------------------
class P4CNN(nn.Module):
    """The 7-layer P4CNN (Cohen & Welling 2016): Z2CNN with group convolutions.

    ``features.conv1`` lifts images to ``group`` maps; ``features.conv{2..7}`` are group
    convolutions (3x3, 4x4 for layer 7, ``width`` channels, ``padding``), each followed by
    ``features.relu{i}`` and ``features.bn{i}`` (:class:`GroupBatchNorm2d`) in ``order``,
    and by ``features.drop{i}`` for i <= ``dropout_layers``; ``features.maxpool2`` (2x2)
    after layer 2; then ``pool`` (coset max pooling + spatial average,
    :class:`GroupGlobalPool`) and ``fc``.

    The defaults are Edixhoven et al.'s (2023) layout: ReLU then batch norm
    (``order="relu-bn"``), dropout after layers 1-5 (``dropout_layers=5``);
    ``order="bn-relu", dropout_layers=7`` is the layout of the first issue-13 runs.
    ``equivision_layers`` names each block's output (``features.bn{i}`` in the paper's
    layout, ``features.relu{i}`` in the other), then ``pool`` and ``fc``.

    ``width=None`` gives ``int(20 / sqrt(G))``: 10 for p4, 7 for p4m.

    Shapes: ``(N, in_channels, H, W)`` with ``H, W >= min_size`` (28 at padding 0) ->
    ``(N, num_classes)``; block outputs ``(N, width, G, h, w)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int | None = None,
                 padding: int = 0, dropout: float = 0.3, group: str = "p4",
                 order: str = "relu-bn", dropout_layers: int = 5) -> None:
        super().__init__()
        self.group = _check_group("p4cnn", group)
        ops = Ops(group)
        width = int(20 / math.sqrt(ops.size)) if width is None else width
        self.in_channels = _check_int("p4cnn", "in_channels", in_channels, 1)
        self.num_classes = _check_int("p4cnn", "num_classes", num_classes, 1)
        self.width = _check_int("p4cnn", "width", width, 1)
        self.padding = _check_int("p4cnn", "padding", padding, 0)
        self.dropout = _check_prob("p4cnn", dropout)
        self.order = _check_order("p4cnn", order)
        self.dropout_layers = _check_dropout_layers("p4cnn", dropout_layers)
        self.features, points = seven_layer_features(
            lambda i, cin, k: ops.conv(cin, width, k, padding=padding, lifting=i == 1),
            ops.bn, lambda: ops.maxpool(2, 2), in_channels, width, order, dropout,
            dropout_layers)
        self.pool = ops.global_pool()
        self.fc = nn.Linear(width, num_classes)
        #: measurement points: each conv block's output, the pooling, the logits
        self.equivision_layers = points + ["pool", "fc"]
        self.min_size = _min_size(padding)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W)`` -> logits ``(N, num_classes)``."""
        _check_input("p4cnn", x, self.in_channels, self.min_size)
        return self.fc(self.pool(self.features(x)))


# ---- ResNets ---------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convolutions (padding 1) with batch norm and a residual connection.

    ``shortcut`` is a 1x1 convolution (stride ``stride``) + batch norm when the stride or the
    width changes, else the identity. Shapes: ``(N, cin, [G,] H, W) -> (N, cout, [G,] H', W')``
    with ``H' = (H - 1) // stride + 1``.
    """

    def __init__(self, ops: Ops, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ops.conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = ops.bn(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = ops.conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = ops.bn(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(ops.conv(cin, cout, 1, stride, 0, bias=False),
                                          ops.bn(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """``(N, cin, [G,] H, W)`` -> ``(N, cout, [G,] H', W')``."""
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of basic blocks built from :class:`Ops` (plain or p4 / p4m).

    Modules: ``stem`` (conv, bn, relu[, maxpool]), stages ``layer1..layerS`` of
    :class:`BasicBlock` (the first block of every stage after the first has stride 2),
    ``pool`` (global pooling, invariant for group networks) and ``fc``.

    Args:
        ops: layer factory.
        name: model name used in error messages.
        widths: channels of each stage (already divided by sqrt(G) for group networks).
        blocks: number of blocks per stage.
        stem: ``"cifar"`` (3x3 conv, stride 1, padding 1) or ``"imagenet"`` (7x7 conv,
            stride 2, padding 3, then 3x3 max pool, stride 2, padding 1).

    Shapes: ``(N, in_channels, H, W)`` -> ``(N, num_classes)``.
    """

    def __init__(self, ops: Ops, name: str, in_channels: int, num_classes: int,
                 widths: list[int], blocks: list[int], stem: str = "cifar") -> None:
        super().__init__()
        self.model_name = name
        self.in_channels = _check_int(name, "in_channels", in_channels, 1)
        self.num_classes = _check_int(name, "num_classes", num_classes, 1)
        self.widths = list(widths)
        if stem == "cifar":
            parts = [ops.conv(in_channels, widths[0], 3, 1, 1, bias=False, lifting=True),
                     ops.bn(widths[0]), nn.ReLU()]
        else:
            parts = [ops.conv(in_channels, widths[0], 7, 2, 3, bias=False, lifting=True),
                     ops.bn(widths[0]), nn.ReLU(), ops.maxpool(3, 2, 1)]
        self.stem = nn.Sequential(*parts)
        points = ["stem"]
        cin = widths[0]
        for s, (w, n) in enumerate(zip(widths, blocks), start=1):
            stage = nn.Sequential(*[BasicBlock(ops, cin if b == 0 else w, w,
                                               2 if b == 0 and s > 1 else 1)
                                    for b in range(n)])
            self.add_module(f"layer{s}", stage)
            points += [f"layer{s}.{b}" for b in range(n)]
            cin = w
        self.stages = len(widths)
        self.pool = ops.global_pool()
        self.fc = nn.Linear(cin, num_classes)
        #: measurement points: the stem, each block's output, the pooling, the logits
        self.equivision_layers = points + ["pool", "fc"]

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W)`` -> logits ``(N, num_classes)``."""
        _check_input(self.model_name, x, self.in_channels, 1)
        x = self.stem(x)
        for s in range(1, self.stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(self.pool(x))


def _cifar_resnet(name: str, group: str | None, in_channels: int, num_classes: int,
                  depth: int, width: float) -> ResNet:
    depth = _check_int(name, "depth", depth, 8)
    if (depth - 2) % 6:
        raise ValueError(f"{name}: depth must be 6n + 2 (8, 14, 20, ..., 44, ...), got {depth}")
    ops = Ops(group)
    width = _check_width(name, width)
    widths = [ops.channels(b, width) for b in (16, 32, 64)]
    return ResNet(ops, name, in_channels, num_classes, widths, [(depth - 2) // 6] * 3, "cifar")


def _imagenet_resnet18(name: str, group: str | None, in_channels: int, num_classes: int,
                       width: float) -> ResNet:
    ops = Ops(group)
    width = _check_width(name, width)
    widths = [ops.channels(b, width) for b in (64, 128, 256, 512)]
    return ResNet(ops, name, in_channels, num_classes, widths, [2, 2, 2, 2], "imagenet")


# ---- registry ------------------------------------------------------------------------------
@register_model("z2cnn")
def z2cnn(in_channels: int = 1, num_classes: int = 10, width: int = 20, padding: int = 0,
          dropout: float = 0.3, order: str = "relu-bn", dropout_layers: int = 5) -> CNN7:
    """The paper's Z2CNN, the plain baseline of P4CNN: :class:`CNN7` in Edixhoven et al.'s
    layout by default (ReLU then batch norm, dropout after layers 1-5); ``cnn7`` is the
    same network in the ``"bn-relu"`` layout with dropout after all 7 layers."""
    return CNN7(in_channels, num_classes, width, padding, dropout, order, dropout_layers)


@register_model("p4cnn")
def p4cnn(in_channels: int = 1, num_classes: int = 10, width: int | None = None,
          padding: int = 0, dropout: float = 0.3, group: str = "p4", order: str = "relu-bn",
          dropout_layers: int = 5) -> P4CNN:
    """The 7-layer P4CNN (``group="p4m"`` for P4MCNN) in Edixhoven et al.'s layout by
    default; see :class:`P4CNN`. Exact at 28x28."""
    return P4CNN(in_channels, num_classes, width, padding, dropout, group, order,
                 dropout_layers)


# checkpoints written before the layout options existed hold the old layout
for _name in ("z2cnn", "p4cnn"):
    register_legacy_arguments(_name, order="bn-relu", dropout_layers=7)


@register_model("resnet44")
def resnet44(in_channels: int = 3, num_classes: int = 10, depth: int = 44,
             width: float = 1.0) -> ResNet:
    """CIFAR-style ResNet (``depth = 6n + 2``, widths ``16/32/64 * width``)."""
    return _cifar_resnet("resnet44", None, in_channels, num_classes, depth, width)


@register_model("p4resnet44")
def p4resnet44(in_channels: int = 3, num_classes: int = 10, depth: int = 44,
               width: float = 1.0, group: str = "p4") -> ResNet:
    """p4 (or p4m) CIFAR-style ResNet, widths ``16/32/64 * width / sqrt(G)``; exact at 33."""
    return _cifar_resnet("p4resnet44", _check_group("p4resnet44", group), in_channels,
                         num_classes, depth, width)


@register_model("resnet18")
def resnet18(in_channels: int = 3, num_classes: int = 1000, width: float = 1.0) -> ResNet:
    """ImageNet-style ResNet-18, widths ``64..512 * width``."""
    return _imagenet_resnet18("resnet18", None, in_channels, num_classes, width)


@register_model("p4resnet18")
def p4resnet18(in_channels: int = 3, num_classes: int = 1000, width: float = 1.0,
               group: str = "p4") -> ResNet:
    """p4 (or p4m) ImageNet-style ResNet-18, widths ``64..512 * width / sqrt(G)``; exact
    at 225."""
    return _imagenet_resnet18("p4resnet18", _check_group("p4resnet18", group), in_channels,
                              num_classes, width)
