"""Adversarial attacks, inference-time defenses (purifiers) and robustness evaluation."""

from ..metrics import ConfusionMeter, accuracy, is_segmentation, miou, task_loss
from .attacks import (
    BPDA,
    CW,
    FGSM,
    IFGSM,
    MIM,
    PGD,
    Adaptive,
    FullGradient,
    Houdini,
    IterativeAttack,
    SweepResult,
    sweep_lambda,
)
from .defenses import (
    Defense,
    EquivarianceDefense,
    InvarianceDefense,
    PurifierDefense,
    RandomNoiseDefense,
    default_transforms,
    equivariance_score,
)
from .evaluate import (
    RobustnessConfig,
    RobustnessResult,
    RowResult,
    evaluate_robustness,
)
from .heads import (
    ContrastiveDefense,
    ContrastiveHead,
    RotationDefense,
    RotationHead,
    train_contrastive_head,
    train_rotation_head,
)
from .registry import (
    ATTACKS,
    DEFENSES,
    AttackSpec,
    build_attack,
    build_defense,
    load_head,
    parse_attack,
    save_head,
)
from .wrappers import Normalize, pick_output, select_output

__all__ = [
    "BPDA", "CW", "FGSM", "IFGSM", "MIM", "PGD", "Adaptive", "ConfusionMeter", "FullGradient",
    "Houdini", "IterativeAttack", "Normalize", "SweepResult", "accuracy", "is_segmentation",
    "miou", "pick_output", "select_output", "sweep_lambda", "task_loss",
    "ContrastiveDefense", "ContrastiveHead", "Defense", "EquivarianceDefense",
    "InvarianceDefense", "PurifierDefense", "RandomNoiseDefense", "RotationDefense",
    "RotationHead", "default_transforms", "equivariance_score", "train_contrastive_head",
    "train_rotation_head",
    "ATTACKS", "DEFENSES", "AttackSpec", "RobustnessConfig", "RobustnessResult", "RowResult",
    "build_attack", "build_defense", "evaluate_robustness", "load_head", "parse_attack",
    "save_head",
]
