"""Image retrieval on frozen features: precision@k, mAP and a picture of the nearest matches."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from relreason.errors import RelreasonError
from relreason.figures import off_screen_figure, save_png
from relreason.protocols._common import as_device, as_features, as_labels, check_positive_int, check_seed, precise_float

__all__ = ["plot_retrieval", "retrieval_metrics"]

# Similarity-matrix entries per chunk of queries (each entry costs ~40 bytes while ranking).
_CHUNK_ENTRIES = 2**21


def _rank_chunk(normed: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Indices of all other items, most cosine-similar first, for each query (rows (b, N-1)).

    Ties keep index order (stable sort); the query itself is excluded.
    """
    sims = normed[queries] @ normed.T
    sims[torch.arange(queries.shape[0], device=sims.device), queries] = float("-inf")
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    return order[:, :-1]  # the query, at -inf, is always last


def retrieval_metrics(
    features: Any,
    labels: Any,
    ks: Iterable[int] = (1, 5, 10),
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float | int]:
    """Every item queries all the others by cosine similarity of its features; score the rankings.

    * ``precision@k`` -- share of the ``k`` most similar other items with the query's class,
      averaged over all N queries (``k`` is clipped at N - 1; the key keeps the requested ``k``).
    * ``mAP`` -- mean over queries of average precision over the full ranking of the other
      N - 1 items: ``AP = (1/R) * sum over the ranks r of the R same-class items of
      precision@r``.  A query whose class has no other member has no AP and is left out of
      the mean (``queries_without_match`` counts them; mAP is 0 if every query is such).

    Ties in similarity are broken by item index (lower first).  Values are in percent, like
    every accuracy of :mod:`relreason.evaluate`.  Queries are ranked ``batch_size`` at a time
    (default: as many as keep about 2M similarity entries per chunk), so memory is
    O(batch_size * N); the result does not depend on it.
    """
    x = as_features(features, "features")
    y = as_labels(labels, x.shape[0], "labels")
    n = x.shape[0]
    if n < 2:
        raise RelreasonError("retrieval needs at least 2 items; evaluate on a larger test set")
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(dict.fromkeys(check_positive_int(k, "k") for k in ks))
    if batch_size is None:
        batch_size = max(1, min(n, _CHUNK_ENTRIES // n))
    batch_size = check_positive_int(batch_size, "batch_size")
    target = as_device(device)

    normed = F.normalize(x, dim=1).to(target)
    labels_t = y.to(target)
    exact = precise_float(target)
    ranks = torch.arange(1, n, device=target, dtype=exact)
    hits_at = {k: 0.0 for k in ks}
    ap_sum = 0.0
    without_match = 0
    for start in range(0, n, batch_size):
        queries = torch.arange(start, min(start + batch_size, n), device=target)
        relevant = labels_t[_rank_chunk(normed, queries)] == labels_t[queries].unsqueeze(1)  # (b, N-1)
        for k in ks:
            hits_at[k] += float(relevant[:, : min(k, n - 1)].sum(dim=1, dtype=exact).div(min(k, n - 1)).sum())
        num_relevant = relevant.sum(dim=1)
        precision_at_hits = relevant.cumsum(dim=1).to(exact) / ranks
        ap = (precision_at_hits * relevant).sum(dim=1)
        has_match = num_relevant > 0
        ap_sum += float((ap[has_match] / num_relevant[has_match]).sum())
        without_match += int((~has_match).sum())

    scored = n - without_match
    result: dict[str, float | int] = {f"precision@{k}": 100.0 * hits_at[k] / n for k in ks}
    result["mAP"] = 100.0 * ap_sum / scored if scored else 0.0
    result["queries"] = n
    result["queries_without_match"] = without_match
    return result


def _image_array(image: Any) -> np.ndarray:
    """A displayable (H, W, 3) or (H, W) array from a PIL image, array or (C, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu", torch.float32)
        if t.dim() == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        t = t - t.min()
        return (t / t.max().clamp_min(1e-12)).squeeze(-1).numpy() if t.dim() == 3 else t.numpy()
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return arr


def plot_retrieval(
    dataset: Any,
    features: Any,
    labels: Any,
    path: str | Path,
    num_queries: int = 8,
    top: int = 5,
    seed: int = 0,
) -> Path:
    """Write a PNG grid of retrievals: one row per query, the query then its ``top`` nearest items.

    Queries are ``num_queries`` distinct items drawn with ``numpy.random.default_rng(seed)``
    (shown in index order).  Neighbours are ranked as in :func:`retrieval_metrics`; each is
    framed green when its label equals the query's, red otherwise, and captioned with its
    cosine similarity.  ``dataset[i][0]`` is the image of feature row ``i`` (a PIL image, as
    the relreason datasets give, or an array / tensor).  Written atomically with matplotlib's
    Agg canvas (no display needed); returns the path.
    """
    x = as_features(features, "features")
    y = as_labels(labels, x.shape[0], "labels")
    n = x.shape[0]
    if len(dataset) != n:
        raise RelreasonError(
            f"the dataset has {len(dataset)} images but there are {n} feature rows; pass the dataset the features came from"
        )
    if n < 2:
        raise RelreasonError("retrieval needs at least 2 items; evaluate on a larger test set")
    num_queries = min(check_positive_int(num_queries, "num_queries"), n)
    top = min(check_positive_int(top, "top"), n - 1)
    queries = np.sort(np.random.default_rng(check_seed(seed)).choice(n, size=num_queries, replace=False))
    normed = F.normalize(x, dim=1)
    q = torch.as_tensor(queries, dtype=torch.int64)
    neighbours = _rank_chunk(normed, q)[:, :top]
    sims = (normed[q].unsqueeze(1) * normed[neighbours]).sum(dim=2)

    try:
        fig = off_screen_figure(figsize=(1.4 * (top + 1), 1.55 * num_queries))
    except ImportError:
        raise RelreasonError("matplotlib is not installed; `pip install matplotlib` to draw the retrieval plot") from None

    classes = getattr(dataset, "classes", None)

    def class_name(c: int) -> str:
        return str(classes[c]) if classes is not None and 0 <= c < len(classes) else str(c)

    axes = fig.subplots(num_queries, top + 1, squeeze=False)

    def show(ax: Any, index: int, colour: str, caption: str) -> None:
        ax.imshow(_image_array(dataset[index][0]), cmap="gray", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3.0)
        ax.set_title(caption, fontsize=7)

    for row, query in enumerate(queries):
        show(axes[row, 0], int(query), "black", f"query: {class_name(int(y[query]))}")
        for col in range(top):
            j = int(neighbours[row, col])
            match = bool(y[j] == y[query])
            show(axes[row, col + 1], j, "#2ca02c" if match else "#d62728",
                 f"{class_name(int(y[j]))} {float(sims[row, col]):.3f}")
    fig.suptitle("retrieval: green frame = same class, red = other class", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
