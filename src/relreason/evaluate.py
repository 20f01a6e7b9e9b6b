"""Judge a pretrained backbone by what its features make easy.

Frozen-feature protocols, all on features extracted once with :func:`extract_features`:

* ``"linear"`` -- the protocol of Patacchiola & Storkey (2020): one ``nn.Linear`` on the raw
  features, Adam, cross-entropy, shuffled mini-batches for a fixed number of epochs.
* ``"linear_converged"`` -- multinomial logistic regression on standardised features, trained
  full-batch with L-BFGS until it converges.  A fixed-epoch probe on raw features under-trains
  when feature scales are poor (common for small or random backbones) and then judges the
  optimiser rather than the features; this protocol removes that confound.
* ``"knn"`` -- weighted k-nearest-neighbour vote on cosine similarity (no training at all).
* ``"retrieval"`` -- every test image queries the other test images by cosine similarity;
  precision@1/5/10 and mAP (:func:`retrieval_metrics`, :func:`plot_retrieval`).
* ``"few_label"`` -- the linear probe(s) trained on a class-balanced 1%, 10%, 25% of the
  training labels (:func:`few_label_indices`), tested on the full test set.

And one protocol that trains the backbone itself (so it needs images, not features):

* ``"finetune"`` -- a linear head on a copy of the backbone, both trained with labels
  (:func:`fine_tune`); with ``"few_label"`` it is also run on each label fraction.

:data:`PROTOCOLS` (linear, linear_converged, knn) is the default set; :data:`ALL_PROTOCOLS`
lists every name.  Accuracies, precisions and mAP are always reported in percent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from relreason.checkpoint import atomic_torch_save, atomic_write_bytes, is_checkpoint_path
from relreason.errors import RelreasonError, short_reason
from relreason.protocols import (
    check_label_fractions,
    few_label_indices,
    fine_tune,
    finetune_transform,
    fraction_key,
    fraction_name,
    plot_retrieval,
    retrieval_metrics,
)
from relreason.protocols._common import TransformedDataset as _TransformedDataset
from relreason.protocols._common import as_features as _as_features
from relreason.protocols._common import as_labels as _as_labels
from relreason.protocols._common import check_positive_float as _check_positive_float
from relreason.protocols._common import check_positive_int as _check_positive_int
from relreason.protocols._common import module_device as _module_device
from relreason.protocols._common import precise_float
from relreason.seeding import check_seed

__all__ = [
    "ALL_PROTOCOLS",
    "DEFAULT_LABEL_FRACTIONS",
    "FEATURE_PROTOCOLS",
    "PROTOCOLS",
    "EvaluateConfig",
    "run_evaluation",
    "evaluate_features",
    "extract_features",
    "few_label_indices",
    "few_label_probes",
    "fine_tune",
    "finetune_transform",
    "format_table",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "linear_probe_converged",
    "plot_retrieval",
    "retrieval_metrics",
    "train_linear_classifier",
    "write_results_json",
]

#: The default protocols of ``relreason evaluate``, in table-column order.
PROTOCOLS: tuple[str, ...] = ("linear", "linear_converged", "knn")
#: Every protocol of ``relreason evaluate``, in table-column order.
ALL_PROTOCOLS: tuple[str, ...] = (*PROTOCOLS, "finetune", "retrieval", "few_label")
#: The protocols :func:`evaluate_features` runs on extracted features (all but ``"finetune"``).
FEATURE_PROTOCOLS: tuple[str, ...] = tuple(p for p in ALL_PROTOCOLS if p != "finetune")
#: Linear probes that ``"few_label"`` repeats on a fraction of the training labels.
_LINEAR_PROTOCOLS: tuple[str, ...] = ("linear", "linear_converged")
#: Label fractions of the few-label protocol (the paper's 1%, 10% and 25%).
DEFAULT_LABEL_FRACTIONS: tuple[float, ...] = (0.01, 0.1, 0.25)

# Rows scored per forward pass when measuring accuracy (bounds memory, not results).
_SCORE_CHUNK = 8192


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------


def _matching_features(train_x: Any, test_x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits as float feature matrices of one width."""
    tr_x = _as_features(train_x, "train_x")
    te_x = _as_features(test_x, "test_x")
    if tr_x.shape[1] != te_x.shape[1]:
        raise RelreasonError(
            f"train_x has {tr_x.shape[1]} feature dims but test_x has {te_x.shape[1]}; extract both "
            "splits with the same backbone"
        )
    return tr_x, te_x


def _prepare(
    train_x: Any, train_y: Any, test_x: Any, test_y: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Validate a train/test split of features and labels; also return the number of classes."""
    tr_x, te_x = _matching_features(train_x, test_x)
    tr_y = _as_labels(train_y, tr_x.shape[0], "train_y")
    te_y = _as_labels(test_y, te_x.shape[0], "test_y")
    num_classes = int(max(int(tr_y.max()), int(te_y.max()))) + 1
    return tr_x, tr_y, te_x, te_y, num_classes


def _accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent of rows of ``x`` whose argmax score under ``predict`` equals ``y``."""
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], _SCORE_CHUNK):
            scores = predict(x[start : start + _SCORE_CHUNK])
            correct += int((scores.argmax(dim=1) == y[start : start + _SCORE_CHUNK]).sum())
    return 100.0 * correct / x.shape[0]


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a frozen ``backbone`` over ``dataset`` and return ``(features, labels)``.

    ``dataset[i]`` must be ``(PIL image, int label)``; ``transform`` turns the image into a
    tensor.  The backbone runs in eval mode (BatchNorm uses, and does not update, its running
    statistics) under ``torch.no_grad()``; afterwards every submodule's train/eval flag and the
    backbone's device are restored.  Outputs are flattened per sample.

    Returns float32 CPU features ``(N, d)`` and int64 CPU labels ``(N,)``, in dataset order.
    If ``cache_path`` exists it is loaded instead of running the backbone; otherwise the result
    is written there atomically.  A cache is keyed only by its path: use one path per
    (backbone checkpoint, split, transform).
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
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
            print(f"relreason: note: {cache} holds {len(labels)} items but the dataset has {n_items} now; "
                  "extracting its features again", file=sys.stderr)
        elif current is None or torch.equal(labels, torch.as_tensor(np.asarray(current), dtype=torch.int64)):
            return features, labels

    if n_items == 0:
        raise RelreasonError("dataset is empty; check the dataset root and split")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RelreasonError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from exc

    loader = DataLoader(
        _TransformedDataset(dataset, transform),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=target.type == "cuda",
    )

    modes = [(module, module.training) for module in backbone.modules()]
    original_device = _module_device(backbone)
    feature_chunks: list[torch.Tensor] = []
    label_chunks: list[torch.Tensor] = []
    try:
        backbone.to(target)
        backbone.eval()
        with torch.no_grad():
            for images, labels in tqdm(loader, desc="extracting features", unit="batch", disable=None):
                out = backbone(images.to(target, non_blocking=True))
                if not isinstance(out, torch.Tensor):
                    raise RelreasonError(
                        f"backbone returned {type(out).__name__}, not a tensor; pass a backbone whose "
                        "forward returns the feature tensor"
                    )
                feature_chunks.append(out.reshape(out.shape[0], -1).to("cpu", torch.float32))
                label_chunks.append(labels.to(torch.int64))
    finally:
        for module, was_training in modes:
            module.training = was_training
        if original_device is not None and original_device != target:
            backbone.to(original_device)

    if not feature_chunks:
        raise RelreasonError("dataset yielded no items; check the dataset root and split")
    features = torch.cat(feature_chunks).contiguous()
    labels_all = torch.cat(label_chunks).contiguous()
    if cache is not None:
        try:
            atomic_torch_save({"features": features, "labels": labels_all}, cache)
        except OSError as error:  # a read-only or full disk costs the cache, not the evaluation
            print(f"relreason: warning: could not cache features at {cache} ({error.strerror or error}); "
                  "they are used without being kept", file=sys.stderr)
    return features, labels_all


# --------------------------------------------------------------------------------------------
# Linear probes
# --------------------------------------------------------------------------------------------


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
    x = _as_features(train_x, "train_x")
    y = _as_labels(train_y, x.shape[0], "train_y")
    num_classes = _check_positive_int(num_classes, "num_classes")
    if int(y.max()) >= num_classes:
        raise RelreasonError(
            f"train_y has label {int(y.max())} but num_classes is {num_classes}; pass num_classes > max label"
        )
    epochs = _check_positive_int(epochs, "epochs")
    batch_size = _check_positive_int(batch_size, "batch_size")
    lr = _check_positive_float(lr, "lr")
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
    tr_x, tr_y, te_x, te_y, num_classes = _prepare(train_x, train_y, test_x, test_y)
    layer = train_linear_classifier(tr_x, tr_y, num_classes, epochs, lr, batch_size, seed, device)
    target = torch.device(device)
    return {
        "train_accuracy": _accuracy(layer, tr_x.to(target), tr_y.to(target)),
        "test_accuracy": _accuracy(layer, te_x.to(target), te_y.to(target)),
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
    tr_x, tr_y, te_x, te_y, num_classes = _prepare(train_x, train_y, test_x, test_y)
    try:
        wd = float(weight_decay)
    except (TypeError, ValueError):
        wd = float("nan")
    if not (wd >= 0 and math.isfinite(wd)):
        raise RelreasonError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")
    max_iter = _check_positive_int(max_iter, "max_iter")
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
        "train_accuracy": _accuracy(scores, tr_x.to(target), y),
        "test_accuracy": _accuracy(scores, te_x.to(target), te_y.to(target)),
        "iterations": iterations,
    }


# --------------------------------------------------------------------------------------------
# k-nearest neighbours
# --------------------------------------------------------------------------------------------


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
    tr_x, te_x = _matching_features(train_x, test_x)
    tr_y = _as_labels(train_y, tr_x.shape[0], "train_y")
    k = min(_check_positive_int(k, "k"), tr_x.shape[0])
    temperature = _check_positive_float(temperature, "temperature")
    batch_size = _check_positive_int(batch_size, "batch_size")
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
    te_y = _as_labels(test_y, _as_features(test_x, "test_x").shape[0], "test_y")
    predictions = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, batch_size=batch_size)
    return 100.0 * float((predictions == te_y).sum()) / te_y.shape[0]


# --------------------------------------------------------------------------------------------
# Orchestration and reporting
# --------------------------------------------------------------------------------------------


def _choose_protocols(protocols: Iterable[str], allowed: tuple[str, ...]) -> list[str]:
    """The distinct protocol names of ``protocols`` in the order given, all in ``allowed``."""
    if isinstance(protocols, str):
        protocols = (protocols,)
    chosen = list(dict.fromkeys(protocols))
    if "finetune" in chosen and "finetune" not in allowed:
        raise RelreasonError(
            "protocol 'finetune' trains the backbone, so it needs images, not features; call fine_tune() "
            "or run_evaluation() (relreason evaluate --protocols finetune)"
        )
    unknown = [p for p in chosen if p not in allowed]
    if unknown:
        raise RelreasonError(
            f"unknown evaluation protocol(s) {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}"
        )
    if not chosen:
        raise RelreasonError(f"no evaluation protocol chosen; choose from {', '.join(allowed)}")
    return chosen


def few_label_probes(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    fractions: Iterable[float] = DEFAULT_LABEL_FRACTIONS,
    probes: Iterable[str] = ("linear",),
    linear_epochs: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, Any]]:
    """The linear ``probes`` trained on a class-balanced ``fraction`` of the training rows.

    For each fraction, the rows :func:`few_label_indices` picks (``seed``) train each probe,
    which is tested on the whole test set.  Returns ``{fraction_key: {"fraction", "train_size",
    probe: result, ...}}`` keyed like ``"0.1"``.
    """
    probes = _choose_protocols(probes, _LINEAR_PROTOCOLS)
    fractions = check_label_fractions(fractions)
    tr_x, tr_y, te_x, te_y, _ = _prepare(train_x, train_y, test_x, test_y)
    results: dict[str, dict[str, Any]] = {}
    for fraction in fractions:
        index = torch.from_numpy(few_label_indices(tr_y, fraction, seed))
        sub_x, sub_y = tr_x[index], tr_y[index]
        entry: dict[str, Any] = {"fraction": fraction, "train_size": int(index.shape[0])}
        for probe in probes:
            if probe == "linear":
                entry[probe] = linear_probe(sub_x, sub_y, te_x, te_y, epochs=linear_epochs, seed=seed, device=device)
            else:
                entry[probe] = linear_probe_converged(sub_x, sub_y, te_x, te_y, device=device)
        results[fraction_key(fraction)] = entry
    return results


def evaluate_features(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    protocols: Iterable[str] = PROTOCOLS,
    linear_epochs: int = 100,
    knn_k: int = 200,
    seed: int = 0,
    device: str | torch.device = "cpu",
    label_fractions: Iterable[float] = DEFAULT_LABEL_FRACTIONS,
    retrieval_ks: Iterable[int] = (1, 5, 10),
) -> dict[str, dict[str, Any]]:
    """Run the chosen protocols (any of :data:`FEATURE_PROTOCOLS`) on one train/test feature split.

    Returns ``{protocol: result}`` with ``"linear"`` and ``"linear_converged"`` holding the
    dicts of :func:`linear_probe` / :func:`linear_probe_converged`, ``"knn"`` holding
    ``{"test_accuracy": ...}``, ``"retrieval"`` the :func:`retrieval_metrics` of the test
    features and ``"few_label"`` the :func:`few_label_probes` of ``label_fractions`` with the
    chosen linear probes (the paper's ``"linear"`` when neither is chosen).  Protocol names and
    fractions are checked before anything runs.
    """
    chosen = _choose_protocols(protocols, FEATURE_PROTOCOLS)
    fractions = check_label_fractions(label_fractions) if "few_label" in chosen else ()
    tr_x, tr_y, te_x, te_y, _ = _prepare(train_x, train_y, test_x, test_y)

    results: dict[str, dict[str, Any]] = {}
    for protocol in chosen:
        if protocol == "linear":
            results[protocol] = linear_probe(tr_x, tr_y, te_x, te_y, epochs=linear_epochs, seed=seed, device=device)
        elif protocol == "linear_converged":
            results[protocol] = linear_probe_converged(tr_x, tr_y, te_x, te_y, device=device)
        elif protocol == "knn":
            results[protocol] = {"test_accuracy": knn_accuracy(tr_x, tr_y, te_x, te_y, k=knn_k)}
        elif protocol == "retrieval":
            results[protocol] = retrieval_metrics(te_x, te_y, ks=retrieval_ks, device=device)
        else:
            probes = [p for p in chosen if p in _LINEAR_PROTOCOLS] or ["linear"]
            results[protocol] = few_label_probes(
                tr_x, tr_y, te_x, te_y, fractions, probes, linear_epochs=linear_epochs, seed=seed, device=device
            )
    return results


#: Columns of the main table: (protocol, result key, header), in order.
_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("linear", "test_accuracy", "linear"),
    ("linear_converged", "test_accuracy", "linear_converged"),
    ("knn", "test_accuracy", "knn"),
    ("finetune", "test_accuracy", "finetune"),
    ("retrieval", "mAP", "retrieval mAP"),
    ("retrieval", "precision@1", "retrieval P@1"),
)


def _cell(result: Any, key: str) -> str:
    value = result.get(key) if isinstance(result, Mapping) else None
    return "-" if value is None else f"{float(value):.2f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    """A fixed-width Markdown table: first column left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([render(header), rule, *(render(r) for r in rows)])


def _fraction_label(key: str, entry: Mapping[str, Any]) -> str:
    try:
        return fraction_name(entry.get("fraction", key))
    except (TypeError, ValueError):
        return str(key)


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Render ``{label: evaluate_features(...)}`` (plus ``"finetune"``) as Markdown tables (%).

    The main table has one row per label and one column per headline number present in any
    row: the test accuracy of ``linear``, ``linear_converged``, ``knn`` and ``finetune``, then
    ``retrieval mAP`` and ``retrieval P@1``, then the test accuracy of any other protocol
    (sorted).  When some row has ``"few_label"`` results, a second table follows after a blank
    line: one row per (label, label fraction), one column per probe (test accuracy).  A value
    missing from a row shows ``-``.
    """
    present = {p for row in results.values() for p in row}
    columns = [c for c in _TABLE_COLUMNS if c[0] in present]
    columns += [(p, "test_accuracy", p) for p in sorted(present - set(ALL_PROTOCOLS))]
    few = [(label, row["few_label"]) for label, row in results.items() if isinstance(row.get("few_label"), Mapping)]

    tables = []
    if columns or not few:
        rows = [
            [str(label), *(_cell(row.get(protocol), key) for protocol, key, _ in columns)]
            for label, row in results.items()
        ]
        tables.append(_markdown(["backbone", *(header for _, _, header in columns)], rows))
    if few:
        entries = [(label, key, entry) for label, by_fraction in few for key, entry in by_fraction.items()
                   if isinstance(entry, Mapping)]
        probes = [p for p in (*_LINEAR_PROTOCOLS, "finetune") if any(p in entry for _, _, entry in entries)]
        rows = [
            [str(label), _fraction_label(key, entry), *(_cell(entry.get(p), "test_accuracy") for p in probes)]
            for label, key, entry in entries
        ]
        tables.append(_markdown(["backbone", "labels", *probes], rows))
    return "\n\n".join(tables)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if hasattr(obj, "tolist"):  # torch tensors and numpy arrays / scalars
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_results_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically; return the path.

    Paths, devices, tensors and numpy values are converted to plain JSON types.
    """
    try:
        text = json.dumps(payload, indent=2, default=_json_default) + "\n"
    except (TypeError, ValueError) as exc:
        raise RelreasonError(
            f"results are not JSON serialisable ({exc}); pass plain numbers, strings, lists and dicts"
        ) from exc
    path = Path(path)
    atomic_write_bytes(path, text.encode())
    return path


# --------------------------------------------------------------------------------------------
# The `relreason evaluate` job: a pretrained backbone against a random one, on a labelled dataset
# --------------------------------------------------------------------------------------------


@dataclass
class EvaluateConfig:
    """Every option of ``relreason evaluate``; the CLI and YAML configs fill it by field name."""

    run_dir: str = "runs/relreason"
    weights: str | None = None
    backbone: str | None = None
    dataset: str | None = None
    data_root: str | None = None  # None: the pretraining run's own when evaluating on its dataset, else "data"
    download: bool = False
    image_size: int | None = None
    protocols: tuple[str, ...] = PROTOCOLS
    linear_epochs: int = 100
    knn_k: int = 200
    label_fractions: tuple[float, ...] = DEFAULT_LABEL_FRACTIONS
    finetune_epochs: int = 20
    finetune_backbone_lr: float = 1e-4
    finetune_head_lr: float = 1e-3
    retrieval_plot: bool = True
    random_baseline: bool = True
    batch_size: int = 256
    seed: int = 0
    test_fraction: float | None = None  # a labelled folder without train/ and test/: the share held out to test
    device: str = "auto"
    output: str | None = None
    # Whether a run stopped by its time limit is said to be unfinished: not where that limit is the plan (compare).
    time_limit_ends_the_run: bool = False

    def validate(self) -> None:
        """Refuse bad options with one line each, naming the flag, before any weights or data are read."""
        from relreason.train import resolve_device

        protocols = _choose_protocols(self.protocols, ALL_PROTOCOLS)
        _check_positive_int(self.linear_epochs, "--linear-epochs")
        _check_positive_int(self.knn_k, "--knn-k")
        _check_positive_int(self.batch_size, "--batch-size")
        if self.image_size is not None and self.image_size < 8:
            raise RelreasonError(f"--image-size must be >= 8, got {self.image_size}")
        check_seed(self.seed, "--seed")
        if self.test_fraction is not None:
            from relreason.data import check_test_fraction

            check_test_fraction("folder", self.test_fraction)  # the range; the dataset is known once the run is read
        if "few_label" in protocols:
            check_label_fractions(self.label_fractions)
        if "finetune" in protocols:
            _check_positive_int(self.finetune_epochs, "--finetune-epochs")
            _check_positive_float(self.finetune_backbone_lr, "--finetune-backbone-lr")
            _check_positive_float(self.finetune_head_lr, "--finetune-head-lr")
        resolve_device(self.device)


def _load_backbone_source(config: EvaluateConfig) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """The weights file, its metadata (backbone.json beside it, overridden by explicit options) and its state.

    A training checkpoint (``checkpoint-eEEEE-sSSSSSSS.pt``) may be given instead of an exported backbone: its
    backbone is evaluated, described by the options and geometry the checkpoint records.
    """
    from relreason.checkpoint import load_checkpoint

    weights = Path(config.weights) if config.weights else Path(config.run_dir) / "backbone.pt"
    if not weights.is_file():
        raise RelreasonError(
            f"no backbone weights at {weights}; run `relreason pretrain --output-dir {weights.parent}` first "
            "or pass --weights"
        )
    if is_checkpoint_path(weights):
        checkpoint = load_checkpoint(weights)
        saved = checkpoint.get("config", {})
        meta = {key: saved[key] for key in ("backbone", "dataset", "data_root", "test_fraction") if key in saved}
        if checkpoint.get("data_root"):  # absolute (older checkpoints: as typed, relative to where pretrain ran)
            meta["data_root"] = checkpoint["data_root"]
        meta |= checkpoint.get("geometry", {})
        state = checkpoint["backbone"]
    else:
        meta = _read_backbone_meta(weights.parent / "backbone.json")
        state = _load_state_dict(weights)
    if config.backbone:
        meta["backbone"] = config.backbone
    if "backbone" not in meta:
        raise RelreasonError(f"{weights} has no backbone.json beside it; pass --backbone NAME")
    return weights, meta, state


def _read_backbone_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RelreasonError(
            f"{path} cannot be read ({' '.join(str(error).split())}); restore it (pretrain rewrites it when rerun) or "
            "pass --backbone NAME with --weights"
        ) from None
    if not isinstance(meta, dict):
        raise RelreasonError(f"{path} does not hold backbone metadata; restore it or pass --backbone NAME")
    return meta


def _load_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for files that are not (whole) weights
        raise RelreasonError(
            f"{weights} cannot be read as backbone weights ({short_reason(error)}); pass the backbone.pt that "
            "relreason pretrain exports, a training checkpoint, or a state_dict saved with torch.save (not a whole "
            "pickled model, nor a damaged file)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RelreasonError(f"{weights} does not hold a state_dict of tensors; pass the backbone.pt that "
                             "relreason pretrain exports")
    return state


def _check_output_path(output: Path) -> None:
    """Refuse, before any feature is extracted, a results path that could not be written at the end."""
    if output.is_dir():
        raise RelreasonError(f"--output {output} is a folder; give a file path such as {output / 'evaluation.json'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RelreasonError(f"cannot create the folder of --output {output} ({error.strerror}); choose another "
                             "--output") from None
    if not os.access(output.parent, os.W_OK):
        raise RelreasonError(f"{output.parent} is not writable; pass --output with a writable path")


def check_nothing_skipped(dataset: Any, split: str, cache: Path) -> None:
    """An image folder replaces an unreadable file by the next readable one, which training can live with;
    an evaluation would count that image twice, under another file's label. Refuse it (and drop the cache
    that holds those rows, so the next run checks again)."""
    skipped = getattr(dataset, "skipped", None)
    if skipped:
        cache.unlink(missing_ok=True)
        try:
            cache.parent.rmdir()  # a folder made for that cache alone: a refused evaluation leaves nothing
        except OSError:
            pass  # other caches live there
        path, reason = next(iter(skipped.items()))
        raise RelreasonError(
            f"{len(skipped)} image(s) of the '{split}' split cannot be read (e.g. {path}: {reason}); an evaluation "
            "needs every image: remove or replace them"
        )


def labelled_split(name: str, root: str, split: str, download: bool):
    from relreason.data import load_dataset

    dataset = load_dataset(name, root, split, download=download)
    if dataset.labels is None:
        why = getattr(dataset, "why_unlabelled", None)
        raise RelreasonError(
            f"the '{split}' split of dataset '{name}' has no labels{f' ({why})' if why else ''}; evaluation needs "
            "labelled images: for a folder, pass --data-root DIR holding train/ and test/, each with one subfolder "
            "per class"
        )
    return dataset


def check_several_classes(dataset: Any, name: str) -> None:
    """Refuse training labels of one class: every classifier would score 100% on a test set of that class."""
    classes = np.unique(np.asarray(dataset.labels))
    if len(classes) < 2:
        named = getattr(dataset, "classes", None)
        which = f" ('{named[int(classes[0])]}')" if named and len(classes) == 1 else ""
        raise RelreasonError(
            f"the labelled images of dataset '{name}' hold {len(classes)} class{which}; evaluation needs at least 2 "
            "(for a folder: one subfolder per class, in train/ and test/ or split with --test-fraction)"
        )


def pretraining_folder(data_root: str) -> Path:
    """The folder whose images a folder run pretrained on: ``train/`` when its root holds a train/test split."""
    from relreason.data import has_split_dirs

    root = Path(data_root).expanduser()
    return root / "train" if has_split_dirs(root) else root


def count_images_inside(test_set: Any, folder: Path) -> int:
    """How many of ``test_set``'s image files lie in ``folder`` (at any depth; links resolved)."""
    folder = folder.resolve()
    return sum(Path(path).resolve().is_relative_to(folder) for path in getattr(test_set, "paths", ()))


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def load_matching_state(backbone: nn.Module, state: Mapping[str, torch.Tensor], weights: Path, name: str) -> None:
    """Load ``state`` into ``backbone``, or say in one line how far apart they are."""
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        raise RelreasonError(
            f"{weights} does not fit backbone '{name}' ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(misshaped)} mis-shaped tensors); pass the --backbone it was trained with"
        )
    backbone.load_state_dict(state)


def feature_cache_path(cache_dir: Path, backbone: str, weights_key: str, dataset_name: str, split: str,
                       image_size: int, data_tag: str) -> Path:
    """Where the features of a split under given weights are cached: named by all that decides them."""
    return cache_dir / f"{backbone}-{weights_key}-{dataset_name}-{split}-{image_size}px-{data_tag}.pt"


def data_tag_of(dataset_name: str, data_root: str, mean: Any, std: Any, splits: Iterable[Any] = ()) -> str:
    """A short digest of what decides the features of a dataset besides the backbone.

    A feature cache name holds it, so evaluating the same weights on another image folder, on a folder whose
    files changed (each file's path, size and modification time) or with another normalisation never reads
    stale features.
    """
    from relreason.data import dataset_info

    folder = dataset_info(dataset_name).name == "folder"
    root = str(Path(data_root).expanduser().resolve()) if folder else ""
    files = []
    for split in splits if folder else ():
        for path in getattr(split, "paths", ()):
            try:
                stat = os.stat(path)
            except OSError:  # gone or a broken link: extraction finds it unreadable and says so
                files.append([str(path), -1, -1])
                continue
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
    key = json.dumps([dataset_info(dataset_name).name, root, [float(m) for m in mean], [float(v) for v in std], files])
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def run_evaluation(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate the weights (and a random backbone) with the chosen protocols, write JSON; return the payload.

    Features are extracted once per backbone and split (cached beside the weights) for the
    feature protocols; ``finetune`` trains a copy of each backbone on the images.  The
    evaluation dataset may differ from the one pretrained on (cross-domain); its images are
    then normalised with its own statistics.  With ``retrieval`` a PNG of retrievals per
    backbone is written beside the JSON (``<output stem>-retrieval-<label>.png``).
    """
    from relreason.backbones import build_backbone
    from relreason.data import compute_normalization, dataset_info, eval_transform, held_out_split, same_dataset
    from relreason.protocols.finetune import finetune_milestones
    from relreason.train import resolve_device

    config.validate()  # every option, named by its flag, before anything is read or written
    protocols = _choose_protocols(config.protocols, ALL_PROTOCOLS)
    fractions = check_label_fractions(config.label_fractions) if "few_label" in protocols else ()
    if "finetune" in protocols:  # checked by validate() above
        ft_epochs = config.finetune_epochs
        ft_backbone_lr, ft_head_lr = float(config.finetune_backbone_lr), float(config.finetune_head_lr)
    device = resolve_device(config.device)
    weights, meta, state = _load_backbone_source(config)
    # A training checkpoint's results go beside it under their own name, not over the exported backbone's.
    default = f"evaluation-{weights.stem}.json" if is_checkpoint_path(weights) else "evaluation.json"
    output = Path(config.output) if config.output else weights.parent / default
    _check_output_path(output)
    planned_end = config.time_limit_ends_the_run and meta.get("stopped_by") == "time limit"
    if meta.get("finished") is False and not planned_end:  # a time limit or a signal stopped it: a partial run
        print(f"relreason: warning: {weights} is from a run stopped by {meta.get('stopped_by') or 'an interruption'} "
              f"after {meta.get('epochs_done', 0):.2f} epoch(s); rerun its pretrain command to finish it",
              file=sys.stderr)
    dataset_name = config.dataset or meta.get("dataset")
    if not dataset_name:
        raise RelreasonError("no dataset known for these weights; pass --eval-dataset NAME")
    info = dataset_info(dataset_name)
    image_size = config.image_size or meta.get("image_size") or info.image_size
    # The pretraining run's --data-root when the data is the run's own, so its "evaluate with" line just works.
    own_data = same_dataset(dataset_name, meta.get("dataset"))  # names as typed: fashion_mnist is fashion-mnist
    recorded = meta.get("data_root") if own_data else None
    # (A folder must be found where it was; digits reads no files; ./data itself needs no note.)
    if (recorded and info.name not in ("folder", "digits") and not Path(recorded).exists() and not config.data_root
            and not _same_path(recorded, "data")):
        # A run folder copied from another machine: its dataset is looked for here, in ./data.
        print(f"relreason: note: the run's data root {recorded} does not exist here; looking for {dataset_name} in "
              "./data (pass --data-root to say where it is)", file=sys.stderr)
        recorded = None
    data_root = config.data_root or recorded or "data"
    # The run's own held-out share when it was pretrained on part of this very folder (and none was asked for).
    same_folder = own_data and (not config.data_root or (recorded is not None and _same_path(config.data_root, recorded)))
    pretrained_share = meta.get("test_fraction") if same_folder else None
    test_fraction = config.test_fraction if config.test_fraction is not None else pretrained_share
    seen = bool(same_folder and info.name == "folder" and config.test_fraction is not None
                and (pretrained_share is None or config.test_fraction > pretrained_share))
    if test_fraction is not None:
        train_set, test_set = held_out_split(dataset_name, data_root, test_fraction)
        if seen:
            own = "it held none out" if pretrained_share is None else f"it held out {pretrained_share:g}"
            print(f"relreason: warning: the backbone was pretrained on {'all' if pretrained_share is None else 'part'} of "
                  f"the images --test-fraction {config.test_fraction:g} holds out of {data_root} ({own}); pretrain "
                  f"with --test-fraction {config.test_fraction:g} for a test set it never saw", file=sys.stderr)
    else:
        train_set = labelled_split(dataset_name, data_root, info.train_split, config.download)
        test_set = labelled_split(dataset_name, data_root, info.test_split, config.download)
    check_several_classes(train_set, dataset_name)
    if info.name == "folder" and own_data and not same_folder and recorded:
        # Another folder than the run's own, which may still hold (or lie inside) the one it was pretrained on.
        pretrained_on = pretraining_folder(recorded)
        inside = count_images_inside(test_set, pretrained_on)
        if inside:
            seen = True if meta.get("test_fraction") is None else None  # None: perhaps, its own share held out
            print(f"relreason: warning: {inside} of the {len(test_set)} test images lie in {pretrained_on}, "
                  f"which the backbone was pretrained on{'' if seen else ' (less its held-out share)'}; evaluate on "
                  "images outside it for a test set it never saw", file=sys.stderr)
    if own_data and "mean" in meta:
        mean, std = meta["mean"], meta["std"]  # exactly what the backbone was trained on
    elif info.mean is not None:
        mean, std = info.mean, info.std
    else:
        mean, std = compute_normalization(train_set)
    transform = eval_transform(image_size, mean, std)

    digest = hashlib.sha1(weights.read_bytes()).hexdigest()[:12]
    # Beside the weights, unless that folder is read-only (a shared or downloaded backbone): then beside the output.
    cache_dir = (weights.parent if os.access(weights.parent, os.W_OK) else output.parent) / "features"
    data_tag = data_tag_of(dataset_name, data_root, mean, std, (train_set, test_set))
    backbones = {"pretrained": (digest, state)}
    if config.random_baseline:
        backbones["random"] = (f"random-seed{config.seed}", None)
    feature_protocols = [p for p in protocols if p != "finetune"]
    num_classes = int(max(train_set.labels.max(), test_set.labels.max())) + 1

    results: dict[str, Any] = {}
    plots: dict[str, str] = {}
    for label, (key, weights_state) in backbones.items():
        torch.manual_seed(config.seed)
        backbone = build_backbone(meta["backbone"], image_size=image_size)
        if weights_state is not None:
            load_matching_state(backbone, weights_state, weights, meta["backbone"])
            if not (config.image_size or meta.get("image_size")):
                print(f"relreason: note: evaluating at {image_size} px, the dataset's own size (no backbone.json says "
                      "what the weights were trained at); pass --image-size if it was another", file=sys.stderr)
        row: dict[str, Any] = {}
        if feature_protocols:
            features = {}
            for split, dataset in (("train", train_set), ("test", test_set)):
                cache = feature_cache_path(cache_dir, meta["backbone"], key, dataset_name, split, image_size, data_tag)
                features[split] = extract_features(
                    backbone, dataset, transform, batch_size=config.batch_size, device=device, cache_path=cache
                )
                check_nothing_skipped(dataset, split, cache)
            row = evaluate_features(
                *features["train"], *features["test"], protocols=feature_protocols,
                linear_epochs=config.linear_epochs, knn_k=config.knn_k, seed=config.seed, device=device,
                label_fractions=fractions or DEFAULT_LABEL_FRACTIONS,
            )
            if "retrieval" in protocols and config.retrieval_plot:
                plot = output.with_name(f"{output.stem}-retrieval-{label}.png")
                plots[label] = str(plot_retrieval(test_set, *features["test"], plot, seed=config.seed))
        if "finetune" in protocols:
            tune = {
                "train_set": train_set, "test_set": test_set, "train_transform": finetune_transform(image_size, mean, std),
                "test_transform": transform, "num_classes": num_classes, "epochs": ft_epochs,
                "backbone_lr": ft_backbone_lr, "head_lr": ft_head_lr, "seed": config.seed, "device": device,
            }
            row["finetune"] = fine_tune(backbone, **tune)
            for fraction in fractions:
                indices = few_label_indices(train_set.labels, fraction, config.seed)
                row["few_label"][fraction_key(fraction)]["finetune"] = fine_tune(backbone, **tune, label_indices=indices)
        results[label] = {p: row[p] for p in ALL_PROTOCOLS if p in row}

    settings: dict[str, Any] = {"linear_epochs": config.linear_epochs, "knn_k": config.knn_k, "seed": config.seed}
    if fractions:
        settings["label_fractions"] = list(fractions)
    if "finetune" in protocols:
        settings["finetune"] = {
            "epochs": ft_epochs, "backbone_lr": ft_backbone_lr, "head_lr": ft_head_lr, "batch_size": 128,
            "lr_decay_epochs": finetune_milestones(ft_epochs), "lr_decay": 0.1,
        }
    payload = {
        "weights": str(weights),
        "backbone": meta["backbone"],
        "pretrained_on": meta.get("dataset"),
        "dataset": dataset_name,
        "image_size": image_size,
        "normalization": {"mean": [float(m) for m in mean], "std": [float(v) for v in std]},
        "pretraining": {key: meta[key] for key in ("finished", "epochs_done", "stopped_by") if key in meta},
        "train_size": len(train_set),
        "test_size": len(test_set),
        "test_fraction": test_fraction,  # None: the dataset's own test split
        "test_images_seen_in_pretraining": seen,
        "protocols": protocols,
        "settings": settings,
        "results": results,
    }
    if plots:
        payload["retrieval_plots"] = plots
    write_results_json(output, payload)
    return payload | {"output": str(output)}
