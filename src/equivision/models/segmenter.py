"""A small fully convolutional segmenter (encoder-decoder with one skip connection).

Layout, for an input ``(N, C, H, W)`` and width ``w`` (sizes shown for ``H`` and ``W``
divisible by 4; any size >= 2 works, stages then round up: the defense's resized views
need odd sizes):

============  ==========================================  ====================
name          what                                        output
============  ==========================================  ====================
``stem``      conv 3x3, BN, ReLU                          ``(N, w, H, W)``
``enc1``      conv 3x3 stride 2 + conv 3x3 (BN, ReLU)     ``(N, 2w, H/2, W/2)``
``enc2``      conv 3x3 stride 2 + conv 3x3 (BN, ReLU)     ``(N, 4w, H/4, W/4)``
``dec``       upsample ``enc2`` x2, concat ``enc1``, conv  ``(N, 2w, H/2, W/2)``
``logits``    conv 1x1: the class scores before upsampling ``(N, K, H/2, W/2)``
output        bilinear upsampling of ``logits``           ``(N, K, H, W)``
============  ==========================================  ====================

``logits`` is the segmentation-logits layer (before upsampling) that the equivariance
defense reads its features from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cnn import _check_input, _check_int
from .registry import register_model

__all__ = ["Segmenter", "segmenter"]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Segmenter(nn.Module):
    """Encoder (two stride-2 stages) and decoder back to the input resolution.

    Args:
        in_channels: input channels ``C``.
        num_classes: classes ``K`` (background included).
        width: channels ``w`` of the first stage (2w and 4w after).
        skip: concatenate the ``enc1`` features in the decoder.

    Maps ``(N, C, H, W)`` (``H``, ``W`` >= 2) to logits ``(N, K, H, W)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 5, width: int = 12,
                 skip: bool = True) -> None:
        super().__init__()
        _check_int("segmenter", "in_channels", in_channels, 1)
        _check_int("segmenter", "num_classes", num_classes, 2)
        _check_int("segmenter", "width", width, 1)
        self.in_channels, self.skip = in_channels, bool(skip)
        w = width
        self.stem = _conv(in_channels, w)
        self.enc1 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.enc2 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))
        self.dec = _conv(4 * w + (2 * w if self.skip else 0), 2 * w)
        self.logits = nn.Conv2d(2 * w, num_classes, 1)
        self.equivision_layers = ["stem", "enc1", "enc2", "dec", "logits"]

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(N, C, H, W)`` -> per-pixel logits ``(N, K, H, W)``."""
        _check_input("segmenter", x, self.in_channels, 2)
        h, w = x.shape[-2:]
        e1 = self.enc1(self.stem(x))
        e2 = self.enc2(e1)
        up = F.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        d = self.dec(torch.cat([up, e1], 1) if self.skip else up)
        return F.interpolate(self.logits(d), size=(h, w), mode="bilinear", align_corners=False)


@register_model("segmenter")
def segmenter(in_channels: int = 3, num_classes: int = 5, width: int = 12,
              skip: bool = True) -> Segmenter:
    """A small fully convolutional segmenter; see :class:`Segmenter`."""
    return Segmenter(in_channels, num_classes, width, skip)
