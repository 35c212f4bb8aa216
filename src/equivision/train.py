"""Deprecated location of supervised training: use :mod:`equivision.training`.

Kept only so that modules not yet moved (the CLI, the demos, ``robust/heads.py``,
``studies.py``) keep importing; to be removed once they import from
:mod:`equivision.training`.
"""

from .training import CHECKPOINT_NAME, HISTORY_KEYS, TrainConfig, TrainError, evaluate, train

__all__ = ["TrainConfig", "TrainError", "train", "evaluate", "HISTORY_KEYS", "CHECKPOINT_NAME"]
