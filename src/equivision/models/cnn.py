"""Plain (non-equivariant) convolutional networks.

``cnn7`` is the 7-layer Z2CNN of Cohen & Welling (2016), as used as the baseline CNN by
Bruintjes et al. (2023); ``cnn-small`` is a tiny 3-layer network for tests and demos.

Two layouts of the 7-layer block (``order``, ``dropout_layers``): ``"bn-relu"`` with
dropout after all 7 layers (conv, batch norm, ReLU, dropout: ``cnn7``'s default, kept so
that the measurement studies and the defense keep their figures), and the layout of
Edixhoven et al. (2023), ``"relu-bn"`` with dropout after layers 1-5 only ("each layer is
followed by a ReLU activation and batch normalisation layer. A dropout layer with p = 0.3
is added after layers 1 through 5"): the default of ``z2cnn`` and ``p4cnn``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn

from .registry import register_model

__all__ = ["CNN7", "ORDERS", "SmallCNN", "GlobalAvgPool", "cnn7", "cnn_small",
           "seven_layer_features"]

#: the block layouts of the 7-layer CNNs: batch norm before or after the ReLU
ORDERS = ("bn-relu", "relu-bn")


class GlobalAvgPool(nn.AdaptiveAvgPool2d):
    """Global average pooling followed by flattening: (N, C, H, W) -> (N, C).

    A subclass of ``nn.AdaptiveAvgPool2d`` so that tools looking for global pooling layers
    (e.g. :mod:`equivision.measure`) recognise it.
    """

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, C)."""
        return super().forward(x).flatten(1)


def _check_int(model: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{model}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_prob(model: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{model}: dropout must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_input(model: str, x: Tensor, in_channels: int, min_size: int) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"{model} expects a batch of images (N, C, H, W), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{model} was built for {in_channels} input channel(s), got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )
    h, w = x.shape[-2:]
    if h < min_size or w < min_size:
        raise ValueError(
            f"{model} needs inputs of at least {min_size}x{min_size} pixels, got {h}x{w}"
        )


def _check_order(model: str, order: object) -> str:
    if order not in ORDERS:
        raise ValueError(f"{model}: order must be 'relu-bn' (the paper's conv, ReLU, batch "
                         f"norm) or 'bn-relu' (conv, batch norm, ReLU), got {order!r}")
    return str(order)


def _check_dropout_layers(model: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 7:
        raise ValueError(f"{model}: dropout_layers must be an integer from 0 to 7 (dropout "
                         f"after layers 1..dropout_layers; the paper: 5), got {value!r}")
    return value


def seven_layer_features(conv: Callable[[int, int, int], nn.Module],
                         bn: Callable[[int], nn.Module], maxpool: Callable[[], nn.Module],
                         in_channels: int, width: int, order: str, dropout: float,
                         dropout_layers: int) -> tuple[nn.Sequential, list[str]]:
    """The 7 conv blocks of Z2CNN / P4CNN and the names of their outputs.

    Block i is ``conv{i}`` (``conv(i, cin, kernel)`` with ``width`` outputs: 3x3, 4x4 for
    i = 7), then
    ``bn{i}`` and ``relu{i}`` in ``order`` (``"bn-relu"`` or ``"relu-bn"``), then
    ``drop{i}`` for i <= ``dropout_layers``; ``maxpool2`` (``maxpool()``) follows block 2.
    The block's output (the measurement point) is its last module before the dropout,
    which is the identity in eval mode: ``relu{i}`` for ``"bn-relu"``, ``bn{i}`` for
    ``"relu-bn"``. Returns ``(features, ["features.<output of block i>" for i = 1..7])``.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for i in range(1, 8):
        layers[f"conv{i}"] = conv(i, channels, 4 if i == 7 else 3)
        pair = [(f"bn{i}", bn(width)), (f"relu{i}", nn.ReLU())]
        layers.update(pair if order == "bn-relu" else pair[::-1])
        if i <= dropout_layers:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        if i == 2:
            layers["maxpool2"] = maxpool()
        channels = width
    out = "bn" if order == "relu-bn" else "relu"
    return nn.Sequential(layers), [f"features.{out}{i}" for i in range(1, 8)]


class CNN7(nn.Module):
    """The 7-layer Z2CNN (Cohen & Welling 2016; Bruintjes et al. 2023).

    Layers: ``features.conv{i}`` (3x3 for i = 1..6, 4x4 for i = 7, ``width`` channels,
    ``padding`` pixels of zero padding), each followed by ``features.bn{i}`` and
    ``features.relu{i}`` in ``order``, and by ``features.drop{i}`` for i <= ``dropout_layers``;
    ``features.maxpool2`` (2x2) after layer 2; then ``pool`` (global average pooling +
    flatten) and the classifier ``fc``. See :func:`seven_layer_features`.

    ``order="bn-relu", dropout_layers=7`` (the defaults here, and ``cnn7``'s) is this
    library's original layout, which the learned-equivariance studies and the defense were
    measured with; ``order="relu-bn", dropout_layers=5`` is Edixhoven et al.'s (2023)
    Z2CNN, the default of ``z2cnn``. ``equivision_layers`` names each block's output in
    either layout (``features.relu{i}`` or ``features.bn{i}``), then ``pool`` and ``fc``.

    With ``padding=0`` a 28x28 input gives feature maps of 26, 24, (pool) 12, 10, 8, 6, 4 and
    1 pixels. Inputs smaller than :attr:`min_size` raise ``ValueError``.

    Shapes: input (N, in_channels, H, W) with H, W >= ``min_size``; output (N, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 20,
        padding: int = 0,
        dropout: float = 0.3,
        order: str = "bn-relu",
        dropout_layers: int = 7,
    ) -> None:
        super().__init__()
        self.in_channels = _check_int("cnn7", "in_channels", in_channels, 1)
        self.num_classes = _check_int("cnn7", "num_classes", num_classes, 1)
        self.width = _check_int("cnn7", "width", width, 1)
        self.padding = _check_int("cnn7", "padding", padding, 0)
        self.dropout = _check_prob("cnn7", dropout)
        self.order = _check_order("cnn7", order)
        self.dropout_layers = _check_dropout_layers("cnn7", dropout_layers)
        self.features, points = seven_layer_features(
            lambda i, cin, k: nn.Conv2d(cin, width, k, padding=padding),
            nn.BatchNorm2d, lambda: nn.MaxPool2d(2), in_channels, width, order, dropout,
            dropout_layers)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(width, num_classes)
        #: measurement points: each conv block's output, the pooling, the logits
        self.equivision_layers = points + ["pool", "fc"]
        self.min_size = self._min_size()

    def _spatial(self, size: int) -> int | None:
        """Output side length of ``features`` for input side ``size``; None if too small."""
        p = self.padding
        for i in range(1, 8):
            size = size + 2 * p - (4 if i == 7 else 3) + 1
            if size < 1:
                return None
            if i == 2:
                if size < 2:
                    return None
                size //= 2
        return size

    def _min_size(self) -> int:
        size = 1
        while self._spatial(size) is None:
            size += 1
        return size

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> logits (N, num_classes)."""
        _check_input("cnn7", x, self.in_channels, self.min_size)
        return self.fc(self.pool(self.features(x)))


class SmallCNN(nn.Module):
    """A tiny 3-layer CNN for tests and demos.

    ``features.conv{i}`` (3x3, padding 1, ``width`` channels) + ``features.bn{i}`` +
    ``features.relu{i}`` + ``features.drop{i}`` for i = 1..3, then ``pool`` (global average
    pooling + flatten) and ``fc``. Shapes: (N, in_channels, H, W) -> (N, num_classes), any
    H, W >= 1.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels = _check_int("cnn-small", "in_channels", in_channels, 1)
        self.num_classes = _check_int("cnn-small", "num_classes", num_classes, 1)
        self.width = _check_int("cnn-small", "width", width, 1)
        self.dropout = _check_prob("cnn-small", dropout)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for i in range(1, 4):
            layers[f"conv{i}"] = nn.Conv2d(channels, width, 3, padding=1)
            layers[f"bn{i}"] = nn.BatchNorm2d(width)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"drop{i}"] = nn.Dropout(dropout)
            channels = width
        self.features = nn.Sequential(layers)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(width, num_classes)
        #: measurement points: each conv block's output, the pooling, the logits
        self.equivision_layers = [f"features.relu{i}" for i in range(1, 4)] + ["pool", "fc"]

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> logits (N, num_classes)."""
        _check_input("cnn-small", x, self.in_channels, 1)
        return self.fc(self.pool(self.features(x)))


@register_model("cnn7")
def cnn7(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 20,
    padding: int = 0,
    dropout: float = 0.3,
    order: str = "bn-relu",
    dropout_layers: int = 7,
) -> CNN7:
    """The 7-layer CNN (Z2CNN) of the learned-equivariance paper; see :class:`CNN7`.
    Minimum input 28x28 at padding 0.

    Keeps the original layout by default (batch norm before ReLU, dropout after all 7
    layers): the measurement studies (issue 11) and the defense (issue 14) were measured
    with it. ``z2cnn`` is the same network in Edixhoven et al.'s layout."""
    return CNN7(in_channels, num_classes, width, padding, dropout, order, dropout_layers)


@register_model("cnn-small")
def cnn_small(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 8,
    dropout: float = 0.0,
) -> SmallCNN:
    """A tiny 3-layer CNN for tests and demos; see :class:`SmallCNN`."""
    return SmallCNN(in_channels, num_classes, width, dropout)
