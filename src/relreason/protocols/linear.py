"""Linear probes on frozen features: the paper's fixed-epoch probe and a probe run to convergence."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relreason.errors import RelreasonError
from relreason.protocols._common import (
    as_features,
    as_labels,
    check_positive_float,
    check_positive_int,
    checked_split,
    percent_correct,
    precise_float,
)


def train_linear_classifier(
    train_x: Any,
    train_y: Any,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Linear:
    """Train the paper's probe: one ``nn.Linear`` with Adam + cross-entropy on shuffled mini-batches.

    Initialisation (PyTorch's default ``U(-1/sqrt(d), 1/sqrt(d))``) and shuffling draw from a
    private generator seeded with ``seed``, so the global RNG is untouched and repeated calls
    give bit-identical weights on CPU.  Returns the trained layer on ``device``.
    """
    x = as_features(train_x, "train_x")
    y = as_labels(train_y, x.shape[0], "train_y")
    num_classes = check_positive_int(num_classes, "num_classes")
    if int(y.max()) >= num_classes:
        raise RelreasonError(
            f"train_y has label {int(y.max())} but num_classes is {num_classes}; pass num_classes > max label"
        )
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_positive_float(lr, "lr")
    target = torch.device(device)

    generator = torch.Generator().manual_seed(int(seed))
    n, dim = x.shape
    layer = nn.utils.skip_init(nn.Linear, dim, num_classes)  # no draw from the global RNG
    bound = 1.0 / math.sqrt(dim)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    layer.to(target)
    layer.train()
    x, y = x.to(target), y.to(target)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(target)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(layer(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    layer.eval()
    return layer


def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Linear evaluation as in the paper: raw frozen features, one linear layer, Adam, fixed epochs.

    No augmentation and no standardisation.  Returns ``{"train_accuracy", "test_accuracy"}``
    in percent; deterministic for a given ``seed`` (on CPU).
    """
    tr_x, tr_y, te_x, te_y, num_classes = checked_split(train_x, train_y, test_x, test_y)
    layer = train_linear_classifier(tr_x, tr_y, num_classes, epochs, lr, batch_size, seed, device)
    target = torch.device(device)
    return {
        "train_accuracy": percent_correct(layer, tr_x.to(target), tr_y.to(target)),
        "test_accuracy": percent_correct(layer, te_x.to(target), te_y.to(target)),
    }


# Standard deviations below this are treated as this (a constant feature then maps to 0).
_STD_FLOOR = 1e-6

# Above this many feature dims the converged probe works in float32 to bound memory and time.
_FLOAT64_MAX_DIM = 2048


def linear_probe_converged(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    weight_decay: float = 1e-4,
    max_iter: int = 1000,
    device: str | torch.device = "cpu",
) -> dict[str, float | int]:
    """L2-regularised multinomial logistic regression on standardised features, run to convergence.

    Features are standardised with the training mean and std (std floored at 1e-6).  The
    objective ``mean CE + weight_decay * ||W||^2`` (bias unpenalised) is minimised full-batch
    with L-BFGS and a strong-Wolfe line search from a zero start, until the largest gradient
    entry falls below tolerance, progress stalls, or ``max_iter`` iterations pass.  The problem
    is convex, so the result depends on neither a seed nor a learning rate.

    Default ``weight_decay=1e-4``: any positive value makes the objective strongly convex, so a
    unique optimum exists even when the training set is linearly separable (without it the
    weights grow without bound and "converged" is meaningless).  1e-4 on standardised features
    is mild enough not to cost accuracy, and matches scikit-learn's default ``C=1``
    (``weight_decay = 1/(2*C*N)``) at N = 5,000, sitting between it at N = 500 and at N = 50,000.

    Returns ``{"train_accuracy", "test_accuracy"}`` in percent plus ``"iterations"`` (L-BFGS
    iterations used).  Works in float64 up to 2048 feature dims, float32 beyond.
    """
    tr_x, tr_y, te_x, te_y, num_classes = checked_split(train_x, train_y, test_x, test_y)
    try:
        wd = float(weight_decay)
    except (TypeError, ValueError):
        wd = float("nan")
    if not (wd >= 0 and math.isfinite(wd)):
        raise RelreasonError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    max_iter = check_positive_int(max_iter, "max_iter")
    target = torch.device(device)

    dim = tr_x.shape[1]
    dtype = precise_float(target) if dim <= _FLOAT64_MAX_DIM else torch.float32
    x = tr_x.to(target, dtype)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(_STD_FLOOR)
    x = (x - mean) / std
    y = tr_y.to(target)

    weight = torch.zeros(num_classes, dim, dtype=dtype, device=target, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=dtype, device=target, requires_grad=True)
    tol_grad = 1e-7 if dtype == torch.float64 else 1e-5
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter + 25,
        tolerance_grad=tol_grad,
        tolerance_change=1e-12 if dtype == torch.float64 else 1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + wd * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = int(optimizer.state[weight].get("n_iter", 0))

    def scores(batch: torch.Tensor) -> torch.Tensor:
        return F.linear((batch.to(dtype) - mean) / std, weight, bias)

    return {
        "train_accuracy": percent_correct(scores, tr_x.to(target), y),
        "test_accuracy": percent_correct(scores, te_x.to(target), te_y.to(target)),
        "iterations": iterations,
    }
