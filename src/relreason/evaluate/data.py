"""The labelled images an evaluation runs on, the checks they must pass, and the feature cache's names."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from relreason.data import dataset_info, has_split_dirs, load_dataset
from relreason.data.datasets import LoadedDataset
from relreason.data.decoded_folder import DecodedImageFolder, decoding_too_large
from relreason.data.image_folder import DRAFT_MARGIN, ImageFolderDataset, read_in_threads, read_threads
from relreason.errors import RelreasonError, note, warn


def decoded_once(dataset: Any, image_size: int, split: str, progress: bool = True) -> Any:
    """An image folder decoded into memory once, at the square of ``image_size`` that fine-tuning's transforms start
    from (so they see the same pixels; its JPEGs at the ``decode_side`` it was given), rather than read from its files
    every epoch. A folder that would take more than half the memory keeps being read from its files, with a note;
    any other dataset is returned as it is."""
    if not isinstance(dataset, ImageFolderDataset):
        return dataset
    too_large = decoding_too_large(len(dataset), image_size, copies=1, processes=1)  # evaluate runs alone
    if too_large:
        note(f"fine-tuning reads the {split} images from their files every epoch (decoding them "
             f"into memory {too_large})")
        return dataset
    return DecodedImageFolder(dataset, image_size, progress=progress, copies=1, processes=1)


@overload
def without_unreadable(dataset: Any, split: str, cache: Path | None, features: None = None,
                       say: bool = True) -> tuple[Any, None]: ...


@overload
def without_unreadable(dataset: Any, split: str, cache: Path | None, features: tuple[torch.Tensor, torch.Tensor],
                       say: bool = True) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]: ...


def without_unreadable(dataset: Any, split: str, cache: Path | None,
                       features: tuple[torch.Tensor, torch.Tensor] | None = None,
                       say: bool = True) -> tuple[Any, tuple[torch.Tensor, torch.Tensor] | None]:
    """The split and its features without the images that could not be read.

    An image folder replaces an unreadable file by the next readable one, which training can live with; an
    evaluation would count that image twice, under another file's label. So the evaluation leaves such files
    out, as pretraining does, and says so (unless not ``say``); no cache holds the replaced rows, so the next
    run checks again. Without ``features``, every image is read here to find them (nothing else reads them)."""
    if features is None and hasattr(dataset, "skipped"):
        for _ in read_in_threads(dataset.__getitem__, len(dataset), read_threads(dataset)):
            pass
    skipped = getattr(dataset, "skipped", None)
    if not skipped:
        return dataset, features
    if cache is not None:
        try:
            cache.parent.rmdir()  # a folder made for a cache that was not written: a refused run leaves nothing
        except OSError:
            pass  # other caches live there
    keep = [i for i, path in enumerate(dataset.paths) if str(path) not in skipped]
    if say:
        path, reason = next(iter(skipped.items()))
        warn(f"{len(skipped)} image(s) of the '{split}' split cannot be read (e.g. {path}: "
             f"{reason}); the evaluation leaves them out, on {len(keep)} images, and reads the split again next time "
             "(remove or replace those files to have its features cached)")
    rows = torch.as_tensor(keep, dtype=torch.int64)
    kept = None if features is None else (features[0][rows], features[1][rows])
    return dataset.subset(keep), kept


def labelled_split(name: str, root: str, split: str, download: bool) -> LoadedDataset:
    """Split ``split`` of dataset ``name``, refused in one line when its images have no labels."""
    dataset = load_dataset(name, root, split, download=download)
    if dataset.labels is None:
        why = getattr(dataset, "why_unlabelled", None)
        raise RelreasonError(
            f"the '{split}' split of dataset '{name}' has no labels{f' ({why})' if why else ''}; evaluation needs "
            "labelled images: for a folder, pass --data-root DIR holding train/ and test/, each with one subfolder "
            "per class"
        )
    return dataset


def check_several_classes(dataset: Any, name: str, unreadable: int = 0) -> None:
    """Refuse training labels of one class: every classifier would score 100% on a test set of that class."""
    classes = np.unique(np.asarray(dataset.labels))
    if len(classes) < 2:
        named = getattr(dataset, "classes", None)
        which = f" ('{named[int(classes[0])]}')" if named and len(classes) == 1 else ""
        readable = f" once its {unreadable} unreadable image(s) are left out" if unreadable else ""
        raise RelreasonError(
            f"the labelled images of dataset '{name}' hold {len(classes)} class{which}{readable}; evaluation needs "
            "at least 2 "
            "(for a folder: one subfolder per class, in train/ and test/ or split with --test-fraction)"
        )


def pretraining_folder(data_root: str) -> Path:
    """The folder whose images a folder run pretrained on: ``train/`` when its root holds a train/test split."""
    root = Path(data_root).expanduser()
    return root / "train" if has_split_dirs(root) else root


def count_images_inside(test_set: Any, folder: Path) -> int:
    """How many of ``test_set``'s image files lie in ``folder`` (at any depth; links resolved)."""
    folder = folder.resolve()
    return sum(Path(path).resolve().is_relative_to(folder) for path in getattr(test_set, "paths", ()))


def same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def weights_digest(weights: bytes) -> str:
    """The short digest of a weights file that names its feature caches: other weights, other caches."""
    return hashlib.sha1(weights).hexdigest()[:12]


def state_digest(module: torch.nn.Module) -> str:
    """The short digest of a module's parameters and buffers (names, shapes, dtypes, values): a random backbone's
    caches are named by it, so a factory whose architecture changed under the same name gets its own."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def feature_cache_path(cache_dir: Path, backbone: str, weights_key: str, dataset_name: str, split: str,
                       image_size: int, data_tag: str, backbone_args: Mapping[str, Any] | None = None) -> Path:
    """Where the features of a split under given weights are cached: named by all that decides them (the
    backbone's arguments too: one may change the features and no weight, as a pooling or an activation does)."""
    backbone = backbone.replace(":", "+")  # 'module:factory': no ':' in a file name, which Windows refuses
    if backbone_args:
        arguments = json.dumps(dict(backbone_args), sort_keys=True, default=str)
        backbone += "-args" + hashlib.sha1(arguments.encode()).hexdigest()[:8]
    return cache_dir / f"{backbone}-{weights_key}-{dataset_name}-{split}-{image_size}px-{data_tag}.pt"


def data_tag_of(dataset_name: str, data_root: str, mean: Any, std: Any, splits: Iterable[Any] = ()) -> str:
    """A short digest of what decides the features of a dataset besides the backbone.

    A feature cache name holds it, so evaluating the same weights on another image folder, on a folder whose
    files changed (each file's path, size and modification time), on a named dataset's files elsewhere or changed,
    or with another normalisation never reads stale features.
    """
    folder = dataset_info(dataset_name).name == "folder"
    root = Path(data_root).expanduser().resolve() if folder else None
    given = Path(os.path.abspath(Path(data_root).expanduser()))  # links unresolved, as in the files' paths
    files = []

    def add(name: str, path: Any) -> None:
        try:
            stat = os.stat(path)
        except OSError:  # gone or a broken link: extraction finds it unreadable and says so
            files.append([name, -1, -1])
            return
        files.append([name, stat.st_size, stat.st_mtime_ns])

    for split in splits:
        for path in getattr(split, "paths", ()) if folder else ():
            # Inside the root, so that `--data-root imgs`, `./imgs` and its absolute path name one cache.
            absolute = Path(os.path.abspath(path))
            add(absolute.relative_to(given).as_posix() if absolute.is_relative_to(given) else str(absolute), path)
        for path in () if folder else getattr(split, "source_files", ()):  # a named dataset's, wherever found
            add(str(Path(path).resolve()), path)
    # Features of JPEGs decoded at reduced scale, of photos turned upright: caches of earlier readings are not these.
    decoding = ["jpeg-draft", DRAFT_MARGIN, "exif-upright"] if folder else []
    key = json.dumps([dataset_info(dataset_name).name, str(root or ""), [float(m) for m in mean],
                      [float(v) for v in std], files] + decoding)
    return hashlib.sha1(key.encode()).hexdigest()[:8]
