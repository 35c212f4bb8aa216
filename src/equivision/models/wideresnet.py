"""Wide residual networks (Zagoruyko & Komodakis 2016) for small (28-32 px) images.

``wrn40`` is WideResNet-40-k as used in the model-capacity study of Bruintjes et al. (2023,
section 4.5): a 3x3 stem convolution with 16 channels, then three stages of pre-activation
basic blocks with ``16k``, ``32k`` and ``64k`` channels (``k`` = ``width``), the second and
third stage starting with a stride-2 block; a final batch norm + ReLU, global average
pooling and a linear classifier. ``depth = 6n + 4`` gives ``n`` blocks per stage (40: 6).
"""

from __future__ import annotations

from torch import Tensor, nn

from .cnn import GlobalAvgPool, _check_input, _check_int, _check_prob
from .registry import register_model

__all__ = ["PreActBlock", "WideResNet", "wrn40"]


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, plus shortcut.

    The shortcut is the identity when the shape is kept and a 1x1 convolution (applied to the
    pre-activated input, as in the reference implementation) when the stride or the number of
    channels changes.

    Shapes: (N, cin, H, W) -> (N, cout, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=False)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(N, cin, H, W) -> (N, cout, H', W')."""
        a = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        out = self.conv1(a)
        out = self.conv2(self.drop(self.relu2(self.bn2(out))))
        return out + skip


class WideResNet(nn.Module):
    """WideResNet-``depth``-``width`` for small images.

    Modules: ``stem`` (3x3 conv, 16 channels), stages ``layer1``..``layer3`` of
    :class:`PreActBlock` (``layer{s}.{b}``), ``bn`` + ``relu`` (final pre-activation),
    ``pool`` (:class:`GlobalAvgPool`) and ``fc``. Measurement points
    (``equivision_layers``): the stem, each block's output, the final ReLU, the pooling and
    the logits.

    Shapes: (N, in_channels, H, W) -> (N, num_classes), any H, W >= 1 (feature maps have
    strides 1, 2 and 4).
    """

    def __init__(
        self,
        depth: int = 40,
        width: int = 1,
        in_channels: int = 3,
        num_classes: int = 10,
        dropout: float = 0.0,
        name: str = "wrn40",
    ) -> None:
        super().__init__()
        self.depth = _check_int(name, "depth", depth, 10)
        if (depth - 4) % 6:
            raise ValueError(f"{name}: depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}")
        self.width = _check_int(name, "width", width, 1)
        self.in_channels = _check_int(name, "in_channels", in_channels, 1)
        self.num_classes = _check_int(name, "num_classes", num_classes, 1)
        self.dropout = _check_prob(name, dropout)
        self.model_name = name
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        points = ["stem"]
        cin = 16
        for s, w in enumerate(widths, start=1):
            blocks = [
                PreActBlock(cin if b == 0 else w, w, 2 if b == 0 and s > 1 else 1, dropout)
                for b in range(n)
            ]
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
            points += [f"layer{s}.{b}" for b in range(n)]
            cin = w
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.pool = GlobalAvgPool()
        self.fc = nn.Linear(cin, num_classes)
        #: measurement points: stem, each block's output, final ReLU, pooling, logits
        self.equivision_layers = points + ["relu", "pool", "fc"]
        self.equivision_pool_layer = "pool"
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> logits (N, num_classes)."""
        _check_input(self.model_name, x, self.in_channels, 1)
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(self.relu(self.bn(x))))


@register_model("wrn40")
def wrn40(
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 1,
    depth: int = 40,
    dropout: float = 0.0,
) -> WideResNet:
    """WideResNet-40-``width`` (widen factor, 1, 2, 4, 8 in the paper); ``depth`` (6n + 4)
    may be lowered for tests. See :class:`WideResNet`."""
    return WideResNet(depth, width, in_channels, num_classes, dropout, name="wrn40")
