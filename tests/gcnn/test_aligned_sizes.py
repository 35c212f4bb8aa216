"""The aligned-size search (:func:`aligned_sizes`, :func:`nearest_aligned_size`): the sizes
at which a plain CNN's sampling geometry is aligned, which are not exact sizes because its
weights are unconstrained, and which become exact once the kernels are made symmetric."""

from __future__ import annotations

import copy

import pytest
import torch
from others_models import TinyResNet
from torch import nn

from equivision.gcnn import (
    aligned_sizes,
    analyze_exactness,
    empirical_equivariance_error,
    exact_sizes,
    nearest_aligned_size,
    nearest_exact_size,
)
from equivision.gcnn.exactness import ALIGNED, MISALIGNED, UNCONSTRAINED
from equivision.models import create_model
from equivision.transforms import group_elements

pytestmark = pytest.mark.usefixtures("one_thread")


def symmetrised(model: nn.Module) -> nn.Module:
    """A float64 copy with every conv kernel averaged over p4 (equivariant at stride 1)."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight.clone()
                m.weight.copy_(sum(g.apply_map(w) for g in group_elements("p4")) / 4)
    return net


def test_plain_resnet_aligned_but_never_exact():
    """A torchvision-style ResNet (one stride-2 stage, 3x3 pad 1 and a 1x1 shortcut): the
    grid is aligned at odd sizes, no size is exact, and the measured error at an aligned
    size is still large."""
    net = TinyResNet().eval()
    assert aligned_sizes(net, 8, 15) == [9, 11, 13, 15]
    assert exact_sizes(net, 8, 15) == []
    assert nearest_aligned_size(net, 10) == (9, 11)
    assert nearest_aligned_size(net, 11) == (11, 11)
    assert nearest_exact_size(net, 10) == (None, None)
    report = analyze_exactness(net, 9)
    assert (report.geometry, report.weights) == (ALIGNED, UNCONSTRAINED)
    assert empirical_equivariance_error(net, 9) > 1e-3


def test_aligned_sizes_become_exact_with_symmetric_kernels():
    """The same ResNet with D4-averaged kernels is exact exactly at the aligned sizes."""
    plain = TinyResNet().eval()
    sym = symmetrised(plain)
    assert exact_sizes(sym, 8, 15) == aligned_sizes(plain, 8, 15) == aligned_sizes(sym, 8, 15)
    assert empirical_equivariance_error(sym, 11) < 1e-9
    assert empirical_equivariance_error(sym, 10) > 1e-3
    assert analyze_exactness(plain, 10).geometry == MISALIGNED


def test_group_cnn_aligned_sizes_equal_exact_sizes():
    net = create_model("p4cnn", width=4)
    assert aligned_sizes(net, 25, 30) == exact_sizes(net, 25, 30) == [28, 30]
    assert nearest_aligned_size(net, 29) == nearest_exact_size(net, 29) == (28, 30)
    assert aligned_sizes(net, 30, 25) == []


def test_cnn7_aligned_sizes():
    """The paper's plain 7-layer CNN: one 2x2 max pool, aligned at even sizes from 28."""
    net = create_model("cnn7", in_channels=1)
    assert aligned_sizes(net, 24, 31) == [28, 30]
    assert exact_sizes(net, 24, 31) == []
    assert nearest_aligned_size(net, 29, max_distance=1) == (28, 30)
