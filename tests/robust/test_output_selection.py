"""Models whose forward returns a dict (Hugging Face, torchvision segmentation) or a tuple:
attacks, defenses and the CLI take their logits (``select_output``, ``--output-key``)."""

from __future__ import annotations

import json

import pytest
import torch
from others_models import DictOutCNN
from torch import nn
from torch.utils.data import TensorDataset

from equivision.cli import main
from equivision.robust import RobustnessConfig, evaluate_robustness, pick_output, select_output


def test_pick_output_rules():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert pick_output(a) is a
    assert pick_output({"features": b, "logits": a}) is a
    assert pick_output({"aux": b, "out": a}) is a  # torchvision segmentation
    assert pick_output({"x": a, "y": b}, "y") is b
    assert pick_output((a, b)) is a and pick_output([a, b], 1) is b
    with pytest.raises(ValueError, match=r"keys \['x', 'y'\].*--output-key"):
        pick_output({"x": a, "y": b})
    with pytest.raises(ValueError, match="none is 'z'"):
        pick_output({"x": a}, "z")
    with pytest.raises(ValueError, match="index below 2"):
        pick_output((a, b), 2)
    with pytest.raises(ValueError, match="not a tensor of logits"):
        pick_output({"logits": [a]})


class Plain(nn.Module):
    """The same network returning its logits tensor."""

    def __init__(self, net: DictOutCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[self.net.key]


def data(n: int = 6, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 12, 12, generator=g),
                         torch.randint(0, 10, (n,), generator=g))


def test_dict_model_is_refused_with_what_to_do_then_evaluates_as_its_tensor_twin():
    torch.manual_seed(0)
    net = DictOutCNN(key="scores").eval()
    cfg = RobustnessConfig(eps=0.1, steps=3, seed=0, progress=False, checks="none")
    with pytest.raises(ValueError, match="select_output"):
        evaluate_robustness(net, data(), ["pgd"], None, cfg)
    handle = select_output(net, "scores")
    got = evaluate_robustness(net, data(), ["pgd"], None, cfg)
    handle.remove()
    ref = evaluate_robustness(Plain(net), data(), ["pgd"], None, cfg)
    assert [r.undefended for r in got.rows] == [r.undefended for r in ref.rows]
    assert isinstance(net(torch.rand(1, 1, 12, 12)), dict)  # removed: the model as it was


def test_cli_attack_takes_a_dict_model_and_its_output_key(tmp_path):
    out = tmp_path / "a.json"
    common = ["attack", "--model", "others_models:DictOutCNN", "--data", "digits",
              "--size", "12", "--max-images", "4", "--steps", "2", "--checks", "none",
              "--quiet"]
    assert main([*common, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n_images"] == 4
    assert main([*common, "--output-key", "features"]) == 2  # a map, not logits
