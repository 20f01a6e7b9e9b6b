"""Features of a frozen backbone over a dataset, extracted once and cached."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from relreason.atomic_files import atomic_torch_save
from relreason.errors import RelreasonError, note, warn
from relreason.protocols._common import TransformedDataset, check_positive_int, module_device, module_dtype


def _load_feature_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise RelreasonError(
            f"feature cache {path} could not be read ({type(exc).__name__}); delete it to recompute the features"
        ) from exc
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("features"), torch.Tensor)
        or not isinstance(payload.get("labels"), torch.Tensor)
        or payload["features"].dim() != 2
        or payload["labels"].shape != (payload["features"].shape[0],)
    ):
        raise RelreasonError(
            f"feature cache {path} is not a features/labels file written by relreason; delete it to recompute"
        )
    return payload["features"].to(torch.float32), payload["labels"].to(torch.int64)


def extract_features(
    backbone: nn.Module,
    dataset: Any,
    transform: Callable[[Any], Any] | None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    cache_path: str | Path | None = None,
    threads: int = 1,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a frozen ``backbone`` over ``dataset`` and return ``(features, labels)``.

    ``dataset[i]`` must be ``(PIL image, int label)``; ``transform`` turns the image into a
    tensor.  The backbone runs in eval mode (BatchNorm uses, and does not update, its running
    statistics) under ``torch.no_grad()``; afterwards every submodule's train/eval flag and the
    backbone's device are restored.  Outputs are flattened per sample.

    Returns float32 CPU features ``(N, d)`` and int64 CPU labels ``(N,)``, in dataset order.
    If ``cache_path`` exists it is loaded instead of running the backbone (unless its item count or labels no
    longer match the dataset's: then it is made again); otherwise the result is written there atomically (unless
    the dataset skipped unreadable files: ``dataset.skipped``). Nothing else of the cache is checked, so use one
    path per (backbone checkpoint, split, transform).

    With ``num_workers`` 0, ``threads`` threads fetch and transform each batch's items, the next batch's while the
    backbone runs on this one: for image files, which PIL decodes without holding the interpreter lock. With a
    deterministic transform the result does not depend on their number (``threads`` is ignored with workers).
    ``progress``: a progress bar while standard error is a terminal.
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    threads = check_positive_int(threads, "threads")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise RelreasonError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    try:
        n_items: int | None = len(dataset)
    except TypeError:
        n_items = None

    cache = Path(cache_path) if cache_path is not None else None
    if cache is not None and cache.exists():
        features, labels = _load_feature_cache(cache)
        current = getattr(dataset, "labels", None)
        # Free to check, and they catch a dataset whose files changed under the same name (images added or
        # removed, files moved between class folders): such a cache is stale, and is made again.
        if n_items is not None and len(labels) != n_items:
            note(f"{cache} holds {len(labels)} items but the dataset has {n_items} now; "
                 "extracting its features again")
        elif current is None or torch.equal(labels, torch.as_tensor(np.asarray(current), dtype=torch.int64)):
            return features, labels

    if n_items == 0:
        raise RelreasonError("dataset is empty; check the dataset root and split")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RelreasonError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from exc

    items = TransformedDataset(dataset, transform)
    if threads > 1 and num_workers == 0 and n_items is not None:
        loader: Any = _threaded_batches(items, n_items, batch_size, threads, pin=target.type == "cuda")
    else:
        loader = DataLoader(items, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                            pin_memory=target.type == "cuda")

    modes = [(module, module.training) for module in backbone.modules()]
    original_device = module_device(backbone)
    input_dtype = module_dtype(backbone)
    feature_chunks: list[torch.Tensor] = []
    label_chunks: list[torch.Tensor] = []
    try:
        backbone.to(target)
        backbone.eval()
        with torch.no_grad():
            batches = -(-n_items // batch_size) if n_items is not None else None
            for images, labels in tqdm(loader, desc="extracting features", unit="batch", total=batches,
                                       disable=None if progress else True, leave=False):
                out = backbone(images.to(target, input_dtype, non_blocking=True))
                if not isinstance(out, torch.Tensor):
                    raise RelreasonError(
                        f"backbone returned {type(out).__name__}, not a tensor; pass a backbone whose "
                        "forward returns the feature tensor"
                    )
                feature_chunks.append(out.reshape(out.shape[0], -1).to("cpu", torch.float32))
                label_chunks.append(labels.to(torch.int64))
    finally:
        if hasattr(loader, "close"):  # the threaded reader: stop fetching ahead now, not when collected
            loader.close()
        for module, was_training in modes:
            module.training = was_training
        if original_device is not None and original_device != target:
            backbone.to(original_device)

    if not feature_chunks:
        raise RelreasonError("dataset yielded no items; check the dataset root and split")
    features = torch.cat(feature_chunks).contiguous()
    labels_all = torch.cat(label_chunks).contiguous()
    # An image folder replaced its unreadable files by their neighbours: rows not to be trusted later, unread.
    if cache is not None and not getattr(dataset, "skipped", None):
        try:
            atomic_torch_save({"features": features, "labels": labels_all}, cache)
        except OSError as error:  # a read-only or full disk costs the cache, not the evaluation
            warn(f"could not cache features at {cache} ({error.strerror or error}); "
                 "they are used without being kept")
    return features, labels_all


def _threaded_batches(items: Dataset, n_items: int, batch_size: int, threads: int, pin: bool = False) -> Iterator[Any]:
    """``items`` in order, collated batch by batch as a DataLoader would; ``threads`` threads fetch them, one batch
    ahead of the one handed out (so at most two batches are held). An item's error is raised in its turn."""
    pool = ThreadPoolExecutor(max_workers=threads)

    def submit(start: int) -> list[Future]:
        return [pool.submit(items.__getitem__, i) for i in range(start, min(start + batch_size, n_items))]

    try:
        pending = submit(0)
        for start in range(batch_size, n_items + batch_size, batch_size):
            batch = default_collate([future.result() for future in pending])  # its items freed with their futures
            if pin:  # as the DataLoader pins: the copy to the GPU may then overlap
                batch = [part.pin_memory() for part in batch]
            pending = submit(start) if start < n_items else []
            yield batch
            del batch
    finally:  # also when the caller stops early: the batch fetched ahead is dropped
        pool.shutdown(wait=True, cancel_futures=True)
