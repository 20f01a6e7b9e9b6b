"""Datasets, transforms and the multi-view wrappers used for relational reasoning: per-image views
(``relational_augmentation``, ``MultiViewDataset``) and views made in batches on the device
(``BatchRelationalAugmentation``, ``DeviceMultiViewDataset``, ``BatchViewLoader``, ``EpochBatchSampler``)."""

from .array_dataset import ArrayImageDataset, pil_to_rgb
from .batch_augment import BatchRelationalAugmentation
from .batch_views import BatchViewLoader, DeviceMultiViewDataset, images_as_tensor
from .datasets import (
    DATASET_NAMES,
    DatasetInfo,
    check_test_fraction,
    compute_normalization,
    dataset_info,
    held_out_split,
    load_dataset,
    same_dataset,
)
from .image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, read_skip_log
from .multiview import MultiViewDataset
from .sampler import EpochBatchSampler
from .splits import has_split_dirs, split_image_folder, stratified_split
from .standard_datasets import SYSTEM_DATASET_DIRS
from .transforms import ToRGB, eval_transform, relational_augmentation

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "SYSTEM_DATASET_DIRS",
    "ArrayImageDataset",
    "BatchRelationalAugmentation",
    "BatchViewLoader",
    "DatasetInfo",
    "DeviceMultiViewDataset",
    "EpochBatchSampler",
    "ImageFolderDataset",
    "MultiViewDataset",
    "ToRGB",
    "check_test_fraction",
    "compute_normalization",
    "dataset_info",
    "same_dataset",
    "eval_transform",
    "has_split_dirs",
    "held_out_split",
    "images_as_tensor",
    "load_dataset",
    "pil_to_rgb",
    "read_skip_log",
    "relational_augmentation",
    "split_image_folder",
    "stratified_split",
]
