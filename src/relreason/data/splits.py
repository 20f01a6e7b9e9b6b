"""Train/test splits: a folder's own train/ and test/, a seeded share of each class held out, stratified indices."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from relreason.data.image_folder import ImageFolderDataset
from relreason.errors import RelreasonError


def _held_out_count(test_fraction: float, class_size: int) -> int:
    """How many of a class's images a split holds out: the fraction of them, rounded half up."""
    return int(np.floor(test_fraction * class_size + 0.5))


def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/test index split (sorted indices): ``test_fraction`` of each class, rounded."""
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        test.append(members[: _held_out_count(test_fraction, members.shape[0])])
    test_idx = np.sort(np.concatenate(test))
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


#: Subfolders that hold a folder's held-out images, in the order they are looked for (ImageNet-style: val/).
TEST_DIR_NAMES = ("test", "val", "validation")


def test_dir_of(root: str | os.PathLike) -> Path | None:
    """``root/test`` (or ``root/val``, ``root/validation``) when ``root`` also holds ``train/``: the folder's own split; else None."""
    root = Path(root).expanduser()
    if not (root / "train").is_dir():
        return None
    return next((root / name for name in TEST_DIR_NAMES if (root / name).is_dir()), None)


def image_folders_read(root: str | os.PathLike) -> list[Path]:
    """The folders whose images relreason reads, or may read, from an image folder: beside ``train/``, every name a
    test folder may have (a run folder made as ``test/`` would become the test split), else the root itself. Run
    folders and results must stay out of them, or they would be read as images."""
    root = Path(root).expanduser()
    if test_dir_of(root) is not None:
        return [root / "train", *(root / name for name in TEST_DIR_NAMES)]
    return [root]


def has_split_dirs(root: str | os.PathLike) -> bool:
    """Whether an image folder holds ``train/`` and ``test/``, ``val/`` or ``validation/`` (then pretraining reads ``train/``)."""
    return test_dir_of(root) is not None


def load_folder_split(root: Path, split: str) -> ImageFolderDataset:
    test_dir = test_dir_of(root)
    if split == "train":
        return ImageFolderDataset(root / "train" if test_dir is not None else root)
    if test_dir is None:
        raise RelreasonError(
            f"image folder {root} has no train/ and test/ (or val/ or validation/) subfolders, so it has no 'test' split; "
            "split the images into train/ and test/, each with one subfolder per class (or hold out a share of each "
            "class with --test-fraction, which evaluate and compare take, and pretrain too to keep it unseen)"
        )
    train = ImageFolderDataset(root / "train")
    return ImageFolderDataset(test_dir, classes=train.classes)


def _rank_in_class(paths: Sequence[str], seed: int) -> np.ndarray:
    """A seeded order of files that depends on each file's own name: adding or removing one moves no other."""
    keys = [hashlib.sha1(f"{seed}:{path}".encode("utf-8", "surrogateescape")).hexdigest() for path in paths]
    return np.argsort(np.asarray(keys), kind="stable")


def check_fraction_range(test_fraction: Any) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise RelreasonError(f"--test-fraction must lie in (0, 1), got {test_fraction!r}; pass e.g. 0.2")


def split_image_folder(
    root: str | os.PathLike, test_fraction: float, seed: int = 0
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """A labelled folder without train/ and test/ as two disjoint parts: ``test_fraction`` of each class
    (rounded) held out for testing, the rest for training.

    Within a class the held-out files are those first in an order seeded by each file's path relative to
    ``root``, so a file keeps its side when others are added or removed (at most one file per changed class
    crosses, where the rounded count moves) and when the folder is moved.
    """
    check_fraction_range(test_fraction)
    folder = ImageFolderDataset(root)
    if folder.labels is None:
        raise RelreasonError(
            f"image folder {folder.root} has no classes ({folder.why_unlabelled}); --test-fraction splits a folder "
            "with one subfolder per class"
        )
    if len(np.unique(folder.labels)) < 2:
        raise RelreasonError(
            f"image folder {folder.root} holds one class ('{(folder.classes or ['?'])[int(folder.labels[0])]}'); "
            "--test-fraction holds out a share of each class for evaluation, which needs at least 2: add class "
            "subfolders, or drop --test-fraction"
        )
    relative = [path.relative_to(folder.root).as_posix() for path in folder.paths]
    test: list[int] = []
    for label, name in enumerate(folder.classes or []):
        members = np.flatnonzero(folder.labels == label)
        if len(members) == 0:
            continue
        held_out = _held_out_count(test_fraction, len(members))
        if held_out >= len(members):
            raise RelreasonError(
                f"--test-fraction {test_fraction:g} of class '{name}' ({len(members)} image(s)) leaves none of it to "
                "train on; choose a smaller fraction or add images to that class"
            )
        order = _rank_in_class([relative[i] for i in members], seed)
        test.extend(members[order[:held_out]].tolist())
    test_idx = np.sort(np.asarray(test, dtype=np.int64))
    train_idx = np.setdiff1d(np.arange(len(folder)), test_idx)
    if len(test_idx) == 0:
        raise RelreasonError(
            f"--test-fraction {test_fraction:g} of the {len(folder)} images of {folder.root} rounds to no test image "
            "in any class; choose a larger fraction"
        )
    train_part, test_part = folder.subset(train_idx), folder.subset(test_idx)
    train_part.held_out = len(test_part)
    return train_part, test_part
