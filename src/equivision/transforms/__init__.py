"""Transformations and their actions on images, feature maps, group maps and tokens."""

from .affine import Rotation, Scale, rotate_batch
from .base import InexactActionError, ShapeError, Transform, check_image
from .composite import Compose
from .dihedral import Dihedral, group_elements, hflip, identity, rot90, vflip
from .elements import ElementBatch
from .layout import (
    Layout,
    LayoutError,
    infer_layout,
    infer_strides,
    local_stride,
    map_to_tokens,
    size_stride,
    tokens_to_map,
)
from .photometric import ColorJitter
from .resize import Resize
from .spec import TransformSpec, as_transforms, parse_transforms
from .subpixel import SubpixelShift
from .translation import Translation, shift_zero_fill

__all__ = [
    "ColorJitter", "Compose", "Dihedral", "ElementBatch", "InexactActionError", "Layout",
    "LayoutError", "TransformSpec",
    "Resize", "Rotation", "Scale", "ShapeError", "SubpixelShift", "Transform", "Translation",
    "as_transforms",
    "check_image",
    "group_elements", "hflip", "identity", "infer_layout", "infer_strides", "local_stride",
    "map_to_tokens", "parse_transforms", "rot90", "rotate_batch", "shift_zero_fill",
    "size_stride", "tokens_to_map", "vflip",
]
