"""Plain, obviously-correct implementations kept only to check the library's fast paths against."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF


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


def loop_step(backbone: nn.Module, head: nn.Module, views: list[torch.Tensor], aggregation: str = "cat",
              criterion: nn.Module | None = None):
    """One reference-style forward: concatenate views, embed, loop-aggregate, score, BCE (or ``criterion``).

    Returns the loss, the scores, the targets and the first view's features."""
    features = backbone(torch.cat(views, 0))
    pairs, targets = loop_aggregate(features, len(views), aggregation)
    scores = head(pairs).squeeze()
    loss = (criterion or nn.BCEWithLogitsLoss())(scores, targets)
    return loss, scores, targets, features[: views[0].shape[0]]


def formula_focal(gamma: float, alpha: float):
    """The focal loss written out from its formula: mean over pairs of -w_t (1 - p_t)^gamma log p_t, with
    p_t the predicted probability of the true class and w_t = alpha for positives, 1 - alpha for negatives."""

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        p_true = torch.where(targets == 1, p, 1 - p)
        weight = targets * alpha + (1 - targets) * (1 - alpha)
        return (weight * (1 - p_true) ** gamma * -torch.log(p_true)).mean()

    return loss


#: torchvision's own colour operations, in the column order of ViewParameters.factors.
_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def loop_augment(images: torch.Tensor, params, size: int, mean, std) -> torch.Tensor:
    """Views one at a time, as a per-image pipeline makes them: each channel cropped and resized by PIL (float
    mode, bilinear), flipped, jittered by torchvision in the view's own order, greyed, normalised.
    ``images``: (N, 3, H, W) uint8, one row per view; ``params``: the views' ViewParameters."""
    views = []
    for i in range(images.shape[0]):
        top, left, height, width = params.boxes[i].tolist()
        channels = images[i].float().div(255).numpy()
        view = torch.from_numpy(np.stack([
            np.asarray(Image.fromarray(channel, mode="F").crop((left, top, left + width, top + height))
                       .resize((size, size), Image.BILINEAR))
            for channel in channels
        ])).clamp(0, 1)
        if params.flip[i]:
            view = view.flip(-1)
        if params.jitter[i]:
            for operation in params.order[i].tolist():
                view = _JITTER[operation](view, params.factors[i, operation].item())
        if params.grayscale[i]:
            view = TF.rgb_to_grayscale(view, 3)
        views.append(TF.normalize(view, mean, std))
    return torch.stack(views)


def reference_knn_predict(train_x, train_y, test_x, k, temperature):
    """Loop-by-loop weighted cosine k-NN in float64, for comparison."""
    tr = np.asarray(train_x, dtype=np.float64)
    te = np.asarray(test_x, dtype=np.float64)
    labels = np.asarray(train_y)
    num_classes = int(labels.max()) + 1
    k = min(k, len(tr))
    predictions = []
    for q in te:
        sims = [float(q @ t) / (np.linalg.norm(q) * np.linalg.norm(t)) for t in tr]
        order = sorted(range(len(tr)), key=lambda i: sims[i], reverse=True)[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[labels[i]] += math.exp(sims[i] / temperature)
        predictions.append(int(np.argmax(votes)))
    return predictions


def reference_retrieval(features: np.ndarray, labels: np.ndarray, ks) -> dict[str, float]:
    """A plain per-query loop: rank the others by cosine similarity, count hits, average precision."""
    n = features.shape[0]
    normed = features / np.linalg.norm(features, axis=1, keepdims=True)
    precision = {k: 0.0 for k in ks}
    ap_total, scored = 0.0, 0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        ranked = sorted(others, key=lambda j: -float(normed[i] @ normed[j]))
        rel = [labels[j] == labels[i] for j in ranked]
        for k in ks:
            kk = min(k, n - 1)
            precision[k] += sum(rel[:kk]) / kk
        if sum(rel):
            hits, ap = 0, 0.0
            for rank, r in enumerate(rel, start=1):
                if r:
                    hits += 1
                    ap += hits / rank
            ap_total += ap / sum(rel)
            scored += 1
    out = {f"precision@{k}": 100 * precision[k] / n for k in ks}
    out["mAP"] = 100 * ap_total / scored
    return out


def loop_nt_xent(z1, z2, temperature):
    """Plain per-anchor NT-Xent: for anchor i, -log(exp(s_ip/T) / sum_{k != i} exp(s_ik/T)), averaged."""
    z = torch.cat([z1, z2])
    n, b = z.shape[0], z1.shape[0]
    unit = [z[i] / z[i].norm() for i in range(n)]
    total = 0.0
    for i in range(n):
        p = i + b if i < b else i - b
        denominator = sum(torch.exp(torch.dot(unit[i], unit[k]) / temperature) for k in range(n) if k != i)
        total = total - torch.log(torch.exp(torch.dot(unit[i], unit[p]) / temperature) / denominator)
    return total / n


def plain_focal(logits, targets, gamma, alpha):
    """The focal loss one pair at a time in Python floats (fp64): a value check, no gradient."""
    total = 0.0
    for z, t in zip(logits.tolist(), targets.tolist()):
        p = 1 / (1 + torch.exp(torch.tensor(-z, dtype=torch.float64)))
        p_true = p if t == 1 else 1 - p
        weight = alpha if t == 1 else 1 - alpha
        total += weight * (1 - p_true) ** gamma * -torch.log(p_true)
    return total / len(logits)
