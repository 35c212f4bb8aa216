"""Models written the way other people write them (torchvision / timm style), for testing
that capture and the exactness analyzer hold on models the project did not write."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-bn-relu(inplace)-conv-bn, residual add, relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, cin, H, W)`` -> ``(B, cout, H / stride, W / stride)``."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet: stem, two stages, ``AdaptiveAvgPool2d(1)``,
    ``torch.flatten(x, 1)``, ``fc``. ``(B, 3, H, W)`` -> ``(B, classes)``."""

    def __init__(self, classes: int = 5, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)
        for m in self.modules():  # non-trivial BN statistics so that bn differs from relu
            if isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.bias, 0.0, 1.0)
                m.running_mean.normal_(0.0, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class MeanPoolCNN(nn.Module):
    """Global pooling written as ``x.mean((2, 3))`` in ``forward``.
    ``(B, 3, H, W)`` -> ``(B, classes)``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class ScaledConv(nn.Module):
    """A convolution whose output is multiplied by ``scale``."""

    def __init__(self, conv: nn.Conv2d, scale: float) -> None:
        super().__init__()
        self.conv = conv
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * self.scale


class Attention(nn.Module):
    """timm-style multi-head self-attention with a ``Softmax`` module on the scores."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D)`` -> ``(B, N, D)``; the softmax outputs ``(B, heads, N, N)``."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A ViT with a [CLS] token: patch conv, flatten to tokens, blocks, head on ``x[:, 0]``.
    ``(B, 3, H, W)`` -> ``(B, classes)``."""

    def __init__(self, size: int = 16, patch: int = 4, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        n = (size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class StagedResNet(nn.Module):
    """A torchvision-style ResNet with three stride-2 stages (``layer2``..``layer4``):
    at 28 px the maps are 28, 14, 7 and 4 pixels, so ``layer4`` has stride 8 although
    28 / 4 rounds to 7. ``(B, 3, H, W)`` -> ``(B, classes)``."""

    def __init__(self, classes: int = 5, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, width, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(width, width, stride=2))
        self.layer4 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PatchEmbed(nn.Module):
    """timm-style patch embedding that returns tokens: conv, flatten, transpose.
    ``(B, 3, H, W)`` -> ``(B, (H / patch) (W / patch), dim)``."""

    def __init__(self, patch: int = 4, dim: int = 16) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TokenViT(nn.Module):
    """A ViT whose patch layer returns N tokens and whose blocks see N + 1 ([CLS] added in
    ``forward``); head on ``x[:, 0]``, or on the mean of the tokens with ``cls=False``
    (then the blocks see N tokens too). ``(B, 3, H, W)`` -> ``(B, classes)``."""

    def __init__(self, size: int = 16, patch: int = 4, dim: int = 16, classes: int = 5,
                 cls: bool = True) -> None:
        super().__init__()
        n = (size // patch) ** 2
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cls else None
        self.pos_embed = nn.Parameter(torch.randn(1, n + int(cls), dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block as its authors write it: depthwise 7x7 conv, then LayerNorm and
    two Linear layers on the permuted, channels-last map ``(B, H, W, C)``, a GELU
    module between them, permuted back and added to the input."""

    def __init__(self, dim: int, kernel: int = 7) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """Patchify stem (k = s = 4), ConvNeXt blocks, global mean in ``forward`` and a
    LayerNorm + Linear head (timm's layout). ``kernel=1`` makes every layer pointwise:
    exactly equivariant to 90° rotations and flips of the stem's map."""

    def __init__(self, dim: int = 8, depth: int = 2, kernel: int = 7, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, dim, 4, stride=4)
        self.stages = nn.Sequential(*[ConvNeXtBlock(dim, kernel) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean((-2, -1))))


class TorchEncoderViT(nn.Module):
    """A ViT built from ``nn.TransformerEncoderLayer`` (whose attention calls its
    ``out_proj`` weight functionally, so that module is never called), a [CLS] token,
    and the mean of the patch tokens as the pooled feature (timm's ``global_pool='avg'``)."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 16, depth: int = 2,
                 num_classes: int = 10, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first  # False: the blocks see (N, B, C), as in DETR
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=batch_first)
            for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        x = self.blocks(x) if self.batch_first else self.blocks(x.transpose(0, 1)).transpose(0, 1)
        return self.head(x[:, 1:].mean(1))


class DictOutCNN(nn.Module):
    """A classifier that returns a dict, as Hugging Face models do (``{"logits": ...,
    "features": ...}``); ``key`` renames the logits entry."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, key: str = "logits"):
        super().__init__()
        self.key = key
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.body(x)
        return {"features": f, self.key: self.fc(f.mean((2, 3)))}


class ToChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class PermutingNet(nn.Module):
    """A module that itself permutes a map to channels-last (its output only looks so),
    then a LayerNorm and a mean over the grid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.to_last = ToChannelsLast()
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(self.to_last(self.conv(x))).mean((1, 2)))


class SqueezeExcite(nn.Module):
    """A squeeze-excitation gate: torchvision's way (``AdaptiveAvgPool2d`` and 1x1 convs
    on the ``(B, C, 1, 1)`` map), or the original paper code's (``x.mean`` in ``forward``
    and ``Linear`` layers, ``linear=True``); ``x * gate``."""

    def __init__(self, c: int, linear: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(c, c // 4) if linear else nn.Conv2d(c, c // 4, 1)
        self.act = nn.SiLU(inplace=True)
        self.fc2 = nn.Linear(c // 4, c) if linear else nn.Conv2d(c // 4, c, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3)) if self.linear else self.avg(x)
        g = self.gate(self.fc2(self.act(self.fc1(s))))
        return x * (g[:, :, None, None] if self.linear else g)


class MBConv(nn.Module):
    """EfficientNet's inverted residual: 1x1 expand, depthwise 3x3, squeeze-excitation,
    1x1 project, residual add when the shape allows (SiLU in place)."""

    def __init__(self, cin: int, cout: int, stride: int, linear_se: bool = False) -> None:
        super().__init__()
        mid = 2 * cin
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                    nn.SiLU(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
                                nn.BatchNorm2d(mid), nn.SiLU(inplace=True))
        self.se = SqueezeExcite(mid, linear_se)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.skip else y


class TinyEffNet(nn.Module):
    """An EfficientNet-style network: squeeze-excitation gates (vectors) inside every
    block, then ``F.adaptive_avg_pool2d`` + ``torch.flatten`` + dropout in ``forward``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, linear_se: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(8), nn.SiLU(inplace=True))
        self.blocks = nn.Sequential(MBConv(8, 8, 1, linear_se), MBConv(8, 16, 2, linear_se))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1)
        x = torch.flatten(x, 1)
        return self.head(torch.nn.functional.dropout(x, 0.2, self.training))
