"""k-nearest-neighbour classification on frozen features, by cosine similarity (no training)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from relreason.protocols._common import (
    as_features,
    as_labels,
    check_positive_float,
    check_positive_int,
    matching_features,
)


def knn_predict(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    k: int = 200,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Predict a class per test row by a weighted vote of its ``k`` most cosine-similar train rows.

    Each neighbour votes for its class with weight ``exp(sim / temperature)``; the class with
    the largest total wins (ties go to the lowest class index).  ``k`` is clipped to the train
    size.  Test rows are processed ``batch_size`` at a time, so memory is
    O(batch_size * N_train).  Returns int64 predictions ``(N_test,)``.
    """
    tr_x, te_x = matching_features(train_x, test_x)
    tr_y = as_labels(train_y, tr_x.shape[0], "train_y")
    k = min(check_positive_int(k, "k"), tr_x.shape[0])
    temperature = check_positive_float(temperature, "temperature")
    batch_size = check_positive_int(batch_size, "batch_size")
    num_classes = int(tr_y.max()) + 1

    train_n = F.normalize(tr_x, dim=1)
    test_n = F.normalize(te_x, dim=1)
    predictions = []
    for start in range(0, test_n.shape[0], batch_size):
        sims = test_n[start : start + batch_size] @ train_n.T
        top_sims, top_idx = sims.topk(k, dim=1, largest=True, sorted=True)
        # Subtracting each row's largest similarity rescales that row's weights by a common
        # positive factor: the vote is unchanged and exp() cannot overflow at small temperatures.
        weights = torch.exp((top_sims - top_sims[:, :1]) / temperature)
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, tr_y[top_idx], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    k: int = 200,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> float:
    """Accuracy (percent) of :func:`knn_predict` on the test set."""
    te_y = as_labels(test_y, as_features(test_x, "test_x").shape[0], "test_y")
    predictions = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, batch_size=batch_size)
    return 100.0 * float((predictions == te_y).sum()) / te_y.shape[0]
