"""Datasets, transforms and the multi-view wrapper used for relational reasoning."""

from .datasets import (
    DATASET_NAMES,
    IMAGE_EXTENSIONS,
    SYSTEM_DATASET_DIRS,
    ArrayImageDataset,
    DatasetInfo,
    ImageFolderDataset,
    check_test_fraction,
    compute_normalization,
    dataset_info,
    same_dataset,
    has_split_dirs,
    held_out_split,
    load_dataset,
    pil_to_rgb,
    read_skip_log,
    split_image_folder,
    stratified_split,
)
from .multiview import MultiViewDataset
from .transforms import eval_transform, relational_augmentation

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "SYSTEM_DATASET_DIRS",
    "ArrayImageDataset",
    "DatasetInfo",
    "ImageFolderDataset",
    "MultiViewDataset",
    "check_test_fraction",
    "compute_normalization",
    "dataset_info",
    "same_dataset",
    "eval_transform",
    "has_split_dirs",
    "held_out_split",
    "load_dataset",
    "pil_to_rgb",
    "read_skip_log",
    "relational_augmentation",
    "split_image_folder",
    "stratified_split",
]
