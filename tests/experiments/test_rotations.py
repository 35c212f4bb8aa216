"""Rotation augmentation, accuracy against angle, and the equivariance-error callback."""

import json

import torch
from support.rotations import RandomRotation, plot_accuracy_vs_rotation
from torch import nn
from torch.utils.data import TensorDataset

from equivision.data import circle_crop
from equivision.evaluation import accuracy_vs_rotation
from equivision.measure.callback import EquivarianceErrorCallback
from equivision.models import create_model
from equivision.training import TrainConfig, train


def test_random_rotation_distribution_and_crop():
    x = torch.rand(4, 1, 9, 9)
    exact = RandomRotation(mean=90, sigma=0)(x)
    assert torch.allclose(exact, circle_crop(torch.rot90(x, 1, (-2, -1))))
    torch.manual_seed(0)
    a = RandomRotation(45, 20)(x)
    torch.manual_seed(0)
    assert torch.equal(a, RandomRotation(45, 20)(x))  # reproducible from torch's RNG
    assert (a[..., 0, 0] == 0).all()


class CentreMass(nn.Module):
    """Class 1 if the image's mass is in its left half: not rotation invariant."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].sum((1, 2, 3))
        right = x[..., x.shape[-1] // 2 :].sum((1, 2, 3))
        return torch.stack([right, left], 1)


def test_accuracy_vs_rotation(tmp_path):
    x = torch.zeros(8, 1, 11, 11)
    x[:4, :, 4:7, 1:4] = 1  # mass on the left: label 1
    x[4:, :, 4:7, 7:10] = 1  # right: label 0
    y = torch.tensor([1] * 4 + [0] * 4)
    curve = accuracy_vs_rotation(CentreMass(), TensorDataset(x, y), angles=(0, 90, 180, 360))
    assert curve[0.0] == 1.0 and curve[360.0] == 1.0 and curve[180.0] == 0.0
    assert curve[90.0] == 0.5  # mass moved to the middle column: ties go to class 0
    png = plot_accuracy_vs_rotation({"centre mass": curve}, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_equivariance_error_callback_logs_each_epoch(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(24, 1, 12, 12), torch.randint(0, 3, (24,)))
    model = create_model("cnn-small", num_classes=3)
    cb = EquivarianceErrorCallback(data, "rot90:1", max_images=8, path=tmp_path / "eq.json")
    train(model, data, None, TrainConfig(epochs=2, batch_size=8, device="cpu"),
          callbacks=[cb], progress=False)
    assert len(cb.history) == 2 and cb.history[0]["epoch"] < cb.history[1]["epoch"]
    first = cb.history[0]["layers"]
    assert set(first) == set(model.equivision_layers)
    assert all(v["mse"] is not None and v["mse"] >= 0 for v in first.values())
    assert "Early" in cb.history[-1]["parts"]
    assert len(json.loads((tmp_path / "eq.json").read_text())) == 2
