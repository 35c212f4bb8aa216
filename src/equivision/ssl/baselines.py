"""The two baselines every probe report stands beside: raw pixels and a random encoder.

* :func:`pixel_features` -- the images themselves, flattened, as features ``(N, C*H*W)``
  (fitted to the encoder's input first, so that the pixels and the encoder see the same
  images);
* :func:`random_init_like` -- an untrained twin of an encoder (the same architecture and
  constructor arguments, freshly initialised from a fixed seed).

A pretrained encoder has learned something only where it beats both: raw pixels can be a
strong k-NN feature on small, centred images (the digits score 0.975 20-NN), and a random
ViT is already a fair feature extractor at this scale. :func:`equivision.ssl.probe.
run_probes` (``baselines=True``) runs the same probes on both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..measure.baselines import random_init_copy

__all__ = ["pixel_features", "random_init_like"]


def pixel_features(images: Tensor) -> Tensor:
    """Raw-pixel features of ``images (N, C, H, W)``: ``(N, C*H*W)`` float32 on the CPU."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    return images.detach().float().flatten(1).cpu()


def random_init_like(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """An untrained encoder of ``encoder``'s architecture, in eval mode, on its device.

    Encoders with a ``config()`` method (:class:`~equivision.ssl.vit.SSLViT`) are rebuilt
    with ``type(encoder)(**encoder.config())``, so their own initialisation runs; other
    modules go through :func:`equivision.measure.random_init_copy`. The
    global RNG is left as it was (the weights come from ``seed``).
    """
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = getattr(encoder, "config", None)
        if callable(config):
            twin = type(encoder)(**config())
        else:
            twin, _ = random_init_copy(encoder, seed)
    return twin.to(device).eval()
