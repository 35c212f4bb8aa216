"""Model zoo: a registry of named model builders, one module per model family.

Use :func:`create_model` to build a model by name and :func:`list_models` to see the names.
To add a family, write ``models/<family>.py`` with ``@register_model("name")`` builders and
import it below.
"""

from . import cnn  # noqa: F401  (registers cnn7, cnn-small)
from .cnn import CNN7, GlobalAvgPool, SmallCNN
from .gcnn import P4CNN, ResNet  # noqa: F401  (registers z2cnn, p4cnn, [p4]resnet44/18)
from .mixer import Mixer  # noqa: F401  (registers mixer-small)
from .registry import (
    MODELS,
    create_model,
    list_models,
    model_defaults,
    model_from_checkpoint,
    register_model,
)
from .segmenter import Segmenter  # noqa: F401  (registers segmenter)
from .vit import ViT  # noqa: F401  (registers vit-small)
from .wideresnet import WideResNet  # noqa: F401  (registers wrn40)

__all__ = [
    "CNN7",
    "MODELS",
    "GlobalAvgPool",
    "SmallCNN",
    "create_model",
    "list_models",
    "model_defaults",
    "model_from_checkpoint",
    "register_model",
]
