"""p4 / p4m group-equivariant layers: group convolutions, batch norm and pooling, their
restriction from p4m to p4 (:func:`restrict`) and their export to plain layers
(:func:`export`).

Group feature maps are ``(B, C, G, H, W)`` with the group axis ordered as
:func:`equivision.transforms.group_elements`; the models built from these layers are in
:mod:`equivision.models.gcnn`.
"""

from .exactness import (
    ExactnessReport,
    LayerExactness,
    aligned_sizes,
    analyze_exactness,
    empirical_equivariance_error,
    exact_sizes,
    nearest_aligned_size,
    nearest_exact_size,
)
from .export import (
    CosetGlobalPool,
    CosetPool,
    ExportError,
    export,
    export_batch_norm,
    export_conv,
    export_pool,
)
from .layers import (
    PADDING_MODES,
    GroupConv2d,
    P4ConvP4,
    P4ConvZ2,
    P4MConvP4M,
    P4MConvZ2,
    bank_index,
    group_order,
    output_size,
    restrict,
)
from .norm_pool import (
    GroupAvgPool2d,
    GroupBatchNorm2d,
    GroupGlobalPool,
    GroupMaxPool2d,
    GroupPool,
)
from .translation import TranslationLayer, TranslationReport, analyze_translation

__all__ = [
    "ExactnessReport", "LayerExactness", "analyze_exactness", "empirical_equivariance_error",
    "exact_sizes", "nearest_exact_size", "aligned_sizes", "nearest_aligned_size",
    "TranslationLayer", "TranslationReport",
    "analyze_translation",
    "CosetGlobalPool", "CosetPool", "ExportError", "export", "export_batch_norm", "export_conv",
    "export_pool", "PADDING_MODES", "restrict",
    "GroupAvgPool2d", "GroupBatchNorm2d", "GroupConv2d", "GroupGlobalPool", "GroupMaxPool2d",
    "GroupPool", "P4ConvP4", "P4ConvZ2", "P4MConvP4M", "P4MConvZ2", "bank_index", "group_order",
    "output_size",
]
