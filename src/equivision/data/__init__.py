"""Datasets: built-in digits and photographs, rotated variants, standard file formats.

Every dataset yields ``(image (C, H, W) float in [0, 1], label int)``.
"""

from .base import ImageDataset
from .builtin import BUNDLED_PHOTOS, DEFAULT_PHOTOS, digits, photos, stratified_split
from .formats import load_cifar, load_image_folder, load_mnist_idx
from .registry import DATASETS, describe_datasets, get_dataset, list_datasets, register_dataset
from .rotated import RIGHT_ANGLES, RotatedDataset, circle_crop, circle_mask, rotate_batch
from .synthetic import SyntheticImages

__all__ = [
    "BUNDLED_PHOTOS", "DATASETS", "DEFAULT_PHOTOS", "RIGHT_ANGLES", "ImageDataset",
    "RotatedDataset",
    "SyntheticImages", "circle_crop", "circle_mask", "describe_datasets", "digits",
    "get_dataset", "list_datasets", "load_cifar", "load_image_folder", "load_mnist_idx",
    "photos", "register_dataset", "rotate_batch", "stratified_split",
]
