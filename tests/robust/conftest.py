"""Tiny models and data shared by the tests of the AutoAttack-style attacks."""

import pytest
import torch
from torch import Tensor, nn


def blobs(n: int, seed: int, noise: float = 0.5, k: int = 5) -> tuple[Tensor, Tensor]:
    """Noisy copies of ``k`` random 1x8x8 prototypes in [0, 1] and their classes."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(k, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, k, (n,), generator=g)
    x = (protos[y] + noise * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="session")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    """An MLP trained on :func:`blobs` (5 classes) and 64 test images it classifies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    x, y = blobs(512, 1)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.set_num_threads(threads)
    xt, yt = blobs(64, 2)
    return model.eval(), xt, yt


def segmenter(seed: int = 0, k: int = 4) -> nn.Module:
    """A small convolutional segmenter ``(B, 2, H, W) -> (B, k, H, W)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(8, k, 3, padding=1)).eval()


def seg_batch(model: nn.Module, n: int = 3, size: int = 8) -> tuple[Tensor, Tensor]:
    """Images and labels equal to the model's clean prediction, with an ignored border."""
    x = torch.rand(n, 2, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = model(x).argmax(1)
    labels[:, 0, :] = 255
    return x, labels


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
