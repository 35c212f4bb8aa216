"""Plain (non-equivariant) convolutional networks.

``cnn7`` is the 7-layer Z2CNN of Cohen & Welling (2016), as used as the baseline CNN by
Bruintjes et al. (2023); ``cnn-small`` is a tiny 3-layer network for tests and demos.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .registry import register_model

__all__ = ["CNN7", "SmallCNN", "GlobalAvgPool", "cnn7", "cnn_small"]


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


class CNN7(nn.Module):
    """The 7-layer Z2CNN (Cohen & Welling 2016; Bruintjes et al. 2023).

    Layers: ``features.conv{i}`` (3x3 for i = 1..6, 4x4 for i = 7, ``width`` channels,
    ``padding`` pixels of zero padding), each followed by ``features.bn{i}``,
    ``features.relu{i}`` and ``features.drop{i}``; ``features.maxpool2`` (2x2) after layer 2;
    then ``pool`` (global average pooling + flatten) and the classifier ``fc``.

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
    ) -> None:
        super().__init__()
        self.in_channels = _check_int("cnn7", "in_channels", in_channels, 1)
        self.num_classes = _check_int("cnn7", "num_classes", num_classes, 1)
        self.width = _check_int("cnn7", "width", width, 1)
        self.padding = _check_int("cnn7", "padding", padding, 0)
        self.dropout = _check_prob("cnn7", dropout)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = in_channels
        for i in range(1, 8):
            kernel = 4 if i == 7 else 3
            layers[f"conv{i}"] = nn.Conv2d(channels, width, kernel, padding=padding)
            layers[f"bn{i}"] = nn.BatchNorm2d(width)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"drop{i}"] = nn.Dropout(dropout)
            if i == 2:
                layers["maxpool2"] = nn.MaxPool2d(2)
            channels = width
        self.features = nn.Sequential(layers)
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(width, num_classes)
        #: measurement points: each conv block's output, the pooling, the logits
        self.equivision_layers = [f"features.relu{i}" for i in range(1, 8)] + ["pool", "fc"]
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
) -> CNN7:
    """The paper's 7-layer CNN (Z2CNN); see :class:`CNN7`. Minimum input 28x28 at padding 0."""
    return CNN7(in_channels, num_classes, width, padding, dropout)


@register_model("cnn-small")
def cnn_small(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 8,
    dropout: float = 0.0,
) -> SmallCNN:
    """A tiny 3-layer CNN for tests and demos; see :class:`SmallCNN`."""
    return SmallCNN(in_channels, num_classes, width, dropout)
