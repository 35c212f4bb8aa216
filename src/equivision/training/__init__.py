"""Training: one runner (:mod:`~equivision.training.runner`) that supervised training
(:mod:`~equivision.training.supervised`) and SSL pretraining
(:mod:`equivision.ssl.pretrain`) both drive.

* :mod:`~equivision.training.runner` -- :class:`TrainingTask`, :class:`RunOptions`,
  :func:`run`: the epoch loop, resume with its configuration check, RNG state, CSV logs,
  atomic checkpoints, callbacks;
* :mod:`~equivision.training.resume` -- opening a run's checkpoint, comparing configurations;
* :mod:`~equivision.training.distributed` -- the torchrun hooks (rank/world, barrier,
  gradient averaging, broadcasts);
* :mod:`~equivision.training.config`, :mod:`~equivision.training.batches`,
  :mod:`~equivision.training.optim`, :mod:`~equivision.training.supervised` -- supervised
  classification / segmentation training (:func:`train`, :func:`evaluate`).
"""

from .config import TrainConfig, TrainError
from .resume import config_differences
from .runner import CHECKPOINT_NAME, LOG_NAME, RunOptions, TrainingTask, run
from .supervised import HISTORY_KEYS, SupervisedTask, evaluate, train

__all__ = [
    "TrainConfig",
    "TrainError",
    "train",
    "evaluate",
    "HISTORY_KEYS",
    "CHECKPOINT_NAME",
    "LOG_NAME",
    "SupervisedTask",
    "TrainingTask",
    "RunOptions",
    "run",
    "config_differences",
]
