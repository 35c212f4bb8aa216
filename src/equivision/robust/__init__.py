"""Adversarial attacks, inference-time defenses (purifiers) and robustness evaluation."""

from .defenses import (
    Defense,
    EquivarianceDefense,
    InvarianceDefense,
    PurifierDefense,
    RandomNoiseDefense,
    default_transforms,
    equivariance_score,
)
from .heads import (
    ContrastiveDefense,
    ContrastiveHead,
    RotationDefense,
    RotationHead,
    train_contrastive_head,
    train_rotation_head,
)

__all__ = [
    "ContrastiveDefense", "ContrastiveHead", "Defense", "EquivarianceDefense",
    "InvarianceDefense", "PurifierDefense", "RandomNoiseDefense", "RotationDefense",
    "RotationHead", "default_transforms", "equivariance_score", "train_contrastive_head",
    "train_rotation_head",
]
