"""Relation pairs for self-supervised relational reasoning.

Features arrive view-major: row ``k * B + b`` holds view ``k`` of image ``b``. For every pair of view
blocks ``i < j`` (in the order ``(0,1), (0,2), ..., (1,2), ...``) the reference forms one block of
positives (view i of image b with view j of image b) followed by one block of negatives (view i of
image b with view j of image ``(b - s) mod B``, which is ``torch.roll(block_j, s)``; from block j's side,
view j of image c meets view i of image ``(c + s) mod B``). The shift ``s``
starts at 1, grows by one per block pair and wraps back to 1 when it reaches B, so no image is ever
paired with itself. This module builds those pairs as index tensors in one shot.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from relreason.checks import check_positive_int, whole_number
from relreason.errors import RelreasonError

AGGREGATIONS = ("cat", "sum", "mean", "max")


def check_pairing_sizes(num_views: int, batch_size: int) -> tuple[int, int]:
    """``(K, B)`` as ints, or a one-line error when K views of B images cannot form positive and negative pairs."""
    num_views, batch_size = whole_number(num_views, "K (views per image)"), whole_number(batch_size, "the batch size")
    if num_views < 2:
        raise RelreasonError(
            f"need at least 2 views per image to form relation pairs, got K={num_views}; set K >= 2"
        )
    if batch_size < 2:
        raise RelreasonError(
            f"a batch of {batch_size} image(s) has no negative pairs (an image cannot be its own negative); "
            "use a batch of at least 2 images"
        )
    return num_views, batch_size


def _build_pair_indices(
    num_views: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_pairing_sizes(num_views, batch_size)
    block_i, block_j = torch.triu_indices(num_views, num_views, offset=1, device=device)  # the reference order
    num_block_pairs = block_i.numel()
    shifts = torch.arange(num_block_pairs, device=device) % (batch_size - 1) + 1
    image = torch.arange(batch_size, device=device)
    left_block = block_i[:, None] * batch_size + image  # (P, B)
    right_positive = block_j[:, None] * batch_size + image
    right_negative = block_j[:, None] * batch_size + (image[None, :] - shifts[:, None]) % batch_size
    # Interleave per block pair: [positives of (i,j), negatives of (i,j)], as the reference concatenates.
    left = torch.stack([left_block, left_block], dim=1).reshape(-1)
    right = torch.stack([right_positive, right_negative], dim=1).reshape(-1)
    ones = torch.ones(num_block_pairs, batch_size, device=device)
    targets = torch.stack([ones, torch.zeros_like(ones)], dim=1).reshape(-1)
    return left, right, targets


@lru_cache(maxsize=64)
def _cached_pair_indices(
    num_views: int, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Made once per (K, B, device): on an accelerator, a copy from the host every step would cost a transfer each.
    # Never as inference tensors: a first call under torch.inference_mode() (scoring pairs for a metric) would
    # otherwise cache indices that every later training step fails to save for backward.
    with torch.inference_mode(False):
        return _build_pair_indices(num_views, batch_size, device)


def shared_pair_indices(
    num_views: int, batch_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``relation_pair_indices`` without the copy: the cached tensors themselves, the same ones on every call.

    For per-step use inside the library (no allocation per step); never change them in place.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    num_views, batch_size = check_pairing_sizes(num_views, batch_size)
    if torch.compiler.is_compiling():  # traced into the compiled graph once per shape: no cache to consult
        return _build_pair_indices(num_views, batch_size, device)
    return _cached_pair_indices(num_views, batch_size, device)


def relation_pair_indices(
    num_views: int, batch_size: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of the left and right member of every relation pair, and its target (1 or 0).

    Returns ``(left, right, targets)``, each of length ``K * (K - 1) * B``: ``features[left[p]]`` and
    ``features[right[p]]`` form pair ``p``. The tensors are the caller's own (copies of a per-``(K, B,
    device)`` cache), so changing them in place, e.g. smoothing the targets, affects nothing else.
    """
    left, right, targets = shared_pair_indices(num_views, batch_size, device)
    return left.clone(), right.clone(), targets.clone()


def aggregate_pairs(left: torch.Tensor, right: torch.Tensor, aggregation: str = "cat") -> torch.Tensor:
    """Join the two members of each pair (rows of ``left`` and ``right``) into one relation vector."""
    if aggregation not in AGGREGATIONS:
        raise RelreasonError(f"unknown aggregation '{aggregation}'; choose one of {', '.join(AGGREGATIONS)}")
    # Checked, not left to broadcasting: a (1, d) member would be joined to every pair in silence.
    if left.dim() != 2 or right.dim() != 2 or left.shape[0] != right.shape[0] or (
            aggregation != "cat" and left.shape != right.shape):
        raise RelreasonError(f"aggregate_pairs joins row p of left with row p of right, (P, d) each, got "
                             f"{tuple(left.shape)} and {tuple(right.shape)}; index both with relation_pair_indices(K, B)")
    if aggregation == "cat":
        return torch.cat([left, right], dim=1)
    if aggregation == "sum":
        return left + right
    if aggregation == "mean":
        return (left + right) / 2.0
    return torch.maximum(left, right)


def gather_pairs(
    features: torch.Tensor, left: torch.Tensor, right: torch.Tensor, aggregation: str = "cat"
) -> torch.Tensor:
    """The relation vectors of the pairs ``(features[left[p]], features[right[p]])``, joined by ``aggregation``."""
    # index_select, not features[left]: its backward (index_add) is deterministic on CPU, while advanced
    # indexing's accumulate is not with several threads, which would break bit-exact resume.
    return aggregate_pairs(features.index_select(0, left), features.index_select(0, right), aggregation)


def aggregation_width(feature_dim: int, aggregation: str) -> int:
    """Width of the relation vector that ``aggregation`` makes from two ``feature_dim`` features."""
    if aggregation not in AGGREGATIONS:
        raise RelreasonError(f"unknown aggregation '{aggregation}'; choose one of {', '.join(AGGREGATIONS)}")
    feature_dim = check_positive_int(feature_dim, "feature_dim (the backbone's output width)", example=64)
    return 2 * feature_dim if aggregation == "cat" else feature_dim


def images_per_view_block(features: torch.Tensor, num_views: int) -> int:
    """B, the number of images, of view-major ``features`` ``(K * B, d)``; a one-line error when they do not split
    into K equal view blocks."""
    if not isinstance(features, torch.Tensor):
        raise RelreasonError(f"features must be one tensor (K*B, d), view-major, got a {type(features).__name__}; "
                             "join K per-view feature tensors with torch.cat(features)")
    if features.dim() != 2:
        raise RelreasonError(f"features must have shape (K*B, d), got {tuple(features.shape)}")
    num_views, total = whole_number(num_views, "K (views per image)"), features.shape[0]
    if num_views < 1 or total % num_views:
        raise RelreasonError(
            f"{total} feature rows cannot be split into K={num_views} equal view blocks; "
            "pass all K views of every image"
        )
    return total // num_views


def make_relation_pairs(
    features: torch.Tensor, num_views: int, aggregation: str = "cat"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregated relation pairs and their targets from view-major features of shape ``(K * B, d)``.

    Equal, row for row, to the reference implementation's ``aggregate``.
    """
    batch_size = images_per_view_block(features, num_views)
    left, right, targets = shared_pair_indices(num_views, batch_size, features.device)
    pairs = gather_pairs(features, left, right, aggregation)
    return pairs, targets.to(features.dtype, copy=True)  # the caller's own: the cached one stays intact
