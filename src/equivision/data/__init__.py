"""Datasets: built-in digits and photographs, rotated variants, standard file formats,
real datasets on disk (Fashion-MNIST, MNIST) and :func:`resolve_dataset`, which turns a
name, a path or ``module:attr`` into a dataset.

Every dataset yields ``(image (C, H, W) float in [0, 1], label int)``.
"""

from .base import ImageDataset, concat_datasets, resize_dataset
from .builtin import BUNDLED_PHOTOS, DEFAULT_PHOTOS, digits, photos, stratified_split
from .download import ChecksumError, DownloadError, download_dataset
from .formats import load_cifar, load_image_folder, load_mnist_idx
from .real import (
    REAL_DATASETS,
    DatasetNotFoundError,
    find_real_dataset,
    load_idx_folder,
    load_real_dataset,
    search_folders,
)
from .registry import DATASETS, describe_datasets, get_dataset, list_datasets, register_dataset
from .resolve import SPLITS, VAL_FRACTION, carve_validation, resolve_dataset
from .rotated import RIGHT_ANGLES, RotatedDataset, circle_crop, circle_mask, rotate_batch
from .synthetic import SyntheticImages

__all__ = [
    "BUNDLED_PHOTOS", "DATASETS", "DEFAULT_PHOTOS", "REAL_DATASETS", "RIGHT_ANGLES", "SPLITS",
    "VAL_FRACTION", "ChecksumError", "DatasetNotFoundError", "DownloadError", "ImageDataset",
    "RotatedDataset", "SyntheticImages", "carve_validation", "circle_crop", "circle_mask",
    "concat_datasets", "describe_datasets", "digits", "download_dataset", "find_real_dataset",
    "get_dataset", "list_datasets", "load_cifar", "load_idx_folder", "load_image_folder",
    "load_mnist_idx", "load_real_dataset", "photos", "register_dataset", "resize_dataset",
    "resolve_dataset", "rotate_batch", "search_folders", "stratified_split",
]
