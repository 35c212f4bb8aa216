"""Transformations and their actions on images, feature maps, group maps and tokens."""

from .affine import Rotation, Scale, rotate_batch
from .base import InexactActionError, Layout, ShapeError, Transform, check_image
from .composite import Compose
from .dihedral import Dihedral, group_elements, hflip, identity, rot90, vflip
from .photometric import ColorJitter
from .resize import Resize
from .spec import parse_transforms
from .translation import Translation, shift_zero_fill

__all__ = [
    "ColorJitter", "Compose", "Dihedral", "InexactActionError", "Layout", "Resize", "Rotation",
    "Scale",
    "ShapeError",
    "Transform", "Translation", "check_image", "group_elements", "hflip", "identity",
    "parse_transforms", "rot90", "rotate_batch", "shift_zero_fill", "vflip",
]
