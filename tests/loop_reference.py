"""Plain, obviously-correct implementations kept only to check the library's fast paths against."""

from __future__ import annotations

import torch
from torch import nn


def loop_aggregate(features: torch.Tensor, num_views: int, aggregation: str = "cat"):
    """The reference's aggregate, block pair by block pair, rolling the right block for negatives."""
    size = features.shape[0] // num_views
    pairs, targets = [], []
    shift = 1
    for start_1 in range(0, size * num_views, size):
        for start_2 in range(start_1 + size, size * num_views, size):
            a = features[start_1:start_1 + size]
            b = features[start_2:start_2 + size]
            b_rolled = torch.roll(b, shifts=shift, dims=0)
            for right, target in ((b, 1.0), (b_rolled, 0.0)):
                if aggregation == "cat":
                    pair = torch.cat([a, right], 1)
                elif aggregation == "sum":
                    pair = a + right
                elif aggregation == "mean":
                    pair = (a + right) / 2.0
                elif aggregation == "max":
                    pair, _ = torch.max(torch.stack([a, right], 2), 2)
                else:
                    raise ValueError(aggregation)
                pairs.append(pair)
                targets.append(torch.full((size,), target, dtype=features.dtype))
            shift += 1
            if shift >= size:
                shift = 1
    return torch.cat(pairs, 0), torch.cat(targets, 0)


def reference_head(in_features: int, hidden_features: int = 256) -> nn.Sequential:
    """The notebook's relation head, built here from torch's own modules and defaults (BatchNorm eps 1e-5 and
    momentum 0.1, LeakyReLU slope 0.01), so a changed default in the library's head shows against it."""
    return nn.Sequential(
        nn.Linear(in_features, hidden_features),
        nn.BatchNorm1d(hidden_features),
        nn.LeakyReLU(0.01),
        nn.Linear(hidden_features, 1),
    )


def loop_step(backbone: nn.Module, head: nn.Module, views: list[torch.Tensor], aggregation: str = "cat"):
    """One reference-style forward: concatenate views, embed, loop-aggregate, score, BCE.

    Returns the loss, the scores, the targets and the first view's features."""
    features = backbone(torch.cat(views, 0))
    pairs, targets = loop_aggregate(features, len(views), aggregation)
    scores = head(pairs).squeeze()
    loss = nn.BCEWithLogitsLoss()(scores, targets)
    return loss, scores, targets, features[: views[0].shape[0]]
