"""The demo's Lie-derivative section, at a tiny size."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import TensorDataset

from equivision.measure import lie_demo, random_init_copy


def tiny() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def test_random_init_copy_reinitialises_every_layer_and_leaves_the_model():
    model = tiny()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    before = [p.clone() for p in model.parameters()]
    (a, _), (b, _) = random_init_copy(model, 0), random_init_copy(model, 0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, model[0].weight)
    assert float(a[1].running_mean.abs().max()) == 0.0


def test_section_uses_the_shared_model_or_says_it_fell_back(monkeypatch):
    monkeypatch.setattr(lie_demo, "DEMO_IMAGES", 3)
    monkeypatch.setattr(lie_demo, "DEMO_SEEDS", (0, 1))
    monkeypatch.setattr(lie_demo, "DEMO_GENERATORS", ("tx", "brightness"))
    torch.manual_seed(5)
    model = tiny()
    data = TensorDataset(torch.rand(4, 1, 12, 12), torch.zeros(4, dtype=torch.long))
    text = lie_demo.section_lie_derivative(
        SimpleNamespace(artifacts={"digits_model": (model, data)}, device="cpu"))
    assert "## The Lie derivative per layer" in text and "No trained digits model" not in text
    assert "| 1 |" in text and "tx: random init" in text and " ± " in text
    assert "| brightness |" in text  # the decomposition table
    monkeypatch.setattr(lie_demo, "get_dataset", lambda *a, **k: data)
    monkeypatch.setattr(lie_demo, "create_model", lambda *a, **k: tiny())
    fallback = lie_demo.section_lie_derivative(SimpleNamespace(artifacts={}, device="cpu"))
    assert "No trained digits model" in fallback
