"""Layer-wise measurement of learned invariance and equivariance."""

from .baselines import random_init_copy
from .capture import LayerCapture, MeasureError, first_tensor, select_layers
from .engine import measure
from .lie import lie_derivative
from .lie_report import LieReport
from .parts import PARTS, assign_parts
from .report import METRICS, LayerResult, Report, write_atomic
from .stats import PairStats

__all__ = [
    "METRICS", "PARTS", "LayerCapture", "LayerResult", "LieReport", "MeasureError",
    "PairStats", "Report", "assign_parts", "first_tensor", "lie_derivative", "measure",
    "random_init_copy", "select_layers", "write_atomic",
]
