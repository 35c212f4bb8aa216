"""The cached filter bank of ``GroupConv2d``: used only while no weight gradient is needed
and never stale (in-place writes, optimizer steps, ``load_state_dict``, dtype changes,
``.data`` assignment, train/eval switches, inference mode)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gcnn import D, rand, randomize

from equivision.gcnn import GroupConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(layer: GroupConv2d, x: torch.Tensor) -> torch.Tensor:
    """The layer's output from a freshly built bank (no cache involved)."""
    with torch.no_grad():
        bank = layer.filter_bank()
        bias = None if layer.bias is None else layer.bias.repeat_interleave(layer.group_size)
        b = x.shape[0]
        out = F.conv2d(x.reshape(b, -1, *x.shape[-2:]), bank, bias, layer.stride,
                       layer.padding, layer.dilation, layer.groups)
    return out.view(b, layer.out_channels, layer.group_size, *out.shape[-2:])


def check(layer: GroupConv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, reference(layer, x))
    return y


@pytest.fixture
def layer_and_input():
    layer = randomize(GroupConv2d(3, 2, 3, padding=1, group="p4m")).eval()
    return layer, torch.randn(2, 3, 8, 6, 6)


def test_cache_is_reused_without_weight_gradients(layer_and_input):
    layer, x = layer_and_input
    with torch.no_grad():
        bank = layer.bank_and_bias()[0]
        assert layer.bank_and_bias()[0] is bank
        assert not bank.requires_grad
    layer.weight.requires_grad_(False)  # frozen weights: cached with grad mode on, too
    layer.bias.requires_grad_(False)
    assert layer.bank_and_bias()[0] is bank
    layer.requires_grad_(True)
    trained = layer.bank_and_bias()[0]  # gradients needed: built, never cached
    assert trained.requires_grad and trained is not bank and layer._cache is None
    assert torch.equal(trained.detach(), bank)


def test_in_place_writes_and_optimizer_steps_invalidate(layer_and_input):
    layer, x = layer_and_input
    y0 = check(layer, x)
    with torch.no_grad():
        layer.weight.add_(0.5)
    y1 = check(layer, x)
    assert not torch.equal(y0, y1)
    with torch.no_grad():
        layer.bias.mul_(3.0)  # the bias alone
    y2 = check(layer, x)
    assert not torch.equal(y1, y2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()  # eval mode, gradients on: weights get them
    assert layer.weight.grad is not None and layer.bias.grad is not None
    opt.step()
    assert not torch.equal(check(layer, x), y2)


def test_load_state_dict_dtype_and_data_assignment_invalidate(layer_and_input):
    layer, x = layer_and_input
    check(layer, x)
    other = randomize(GroupConv2d(3, 2, 3, padding=1, group="p4m"), seed=5)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(check(layer, x), other.eval()(x).detach())
    layer.double()
    assert layer._cache is None
    assert check(layer, x.double()).dtype == D
    layer.weight.data = torch.randn_like(layer.weight)  # new storage
    check(layer, x.double())
    layer.weight.data.mul_(2.0)  # bypasses the version counter: clear_cache is documented
    layer.clear_cache()
    check(layer, x.double())


def test_train_eval_switch_and_inference_mode(layer_and_input):
    layer, x = layer_and_input
    check(layer, x)
    layer.train()
    layer(x).sum().backward()
    with torch.no_grad():
        layer.weight.sub_(0.1 * layer.weight.grad)
    layer.eval()
    check(layer, x)
    with torch.inference_mode():
        y = layer(x)
    layer.requires_grad_(False)  # frozen, input gradient wanted: no inference-mode bank
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    out.sum().backward()
    assert torch.equal(out.detach(), y) and xg.grad is not None


def test_no_bias_and_training_path_unchanged():
    layer = GroupConv2d(2, 2, 3, bias=False, group="p4")
    x = rand(1, 2, 4, 5, 5, dtype=torch.float32)
    with torch.no_grad():
        cached = layer(x)
    assert torch.equal(cached, layer(x).detach())
    assert layer._cache is None  # the gradient path dropped it
