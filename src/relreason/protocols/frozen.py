"""The protocols on frozen features by name: which exist, and running a chosen set on one feature split."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from relreason.errors import RelreasonError
from relreason.protocols._common import checked_split
from relreason.protocols.few_label import check_label_fractions, few_label_indices, fraction_key
from relreason.protocols.knn import knn_accuracy
from relreason.protocols.linear import linear_probe, linear_probe_converged
from relreason.protocols.retrieval import retrieval_metrics

#: The default protocols of ``relreason evaluate``, in table-column order.
PROTOCOLS: tuple[str, ...] = ("linear", "linear_converged", "knn")

#: Every protocol of ``relreason evaluate``, in table-column order.
ALL_PROTOCOLS: tuple[str, ...] = (*PROTOCOLS, "finetune", "retrieval", "few_label")

#: The protocols :func:`evaluate_features` runs on extracted features (all but ``"finetune"``).
FEATURE_PROTOCOLS: tuple[str, ...] = tuple(p for p in ALL_PROTOCOLS if p != "finetune")

#: Linear probes that ``"few_label"`` repeats on a fraction of the training labels.
LINEAR_PROTOCOLS: tuple[str, ...] = ("linear", "linear_converged")

#: Label fractions of the few-label protocol (the paper's 1%, 10% and 25%).
DEFAULT_LABEL_FRACTIONS: tuple[float, ...] = (0.01, 0.1, 0.25)


def choose_protocols(protocols: Iterable[str], allowed: tuple[str, ...]) -> list[str]:
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
    probes = choose_protocols(probes, LINEAR_PROTOCOLS)
    fractions = check_label_fractions(fractions)
    tr_x, tr_y, te_x, te_y, _ = checked_split(train_x, train_y, test_x, test_y)
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
    chosen = choose_protocols(protocols, FEATURE_PROTOCOLS)
    fractions = check_label_fractions(label_fractions) if "few_label" in chosen else ()
    tr_x, tr_y, te_x, te_y, _ = checked_split(train_x, train_y, test_x, test_y)

    results: dict[str, dict[str, Any]] = {}
    for protocol in chosen:
        if protocol == "linear":
            results[protocol] = linear_probe(tr_x, tr_y, te_x, te_y, epochs=linear_epochs, seed=seed, device=device)
        elif protocol == "linear_converged":
            results[protocol] = linear_probe_converged(tr_x, tr_y, te_x, te_y, device=device)
        elif protocol == "knn":
            # k as used: at most the training set (a larger --knn-k takes every training image as a neighbour).
            results[protocol] = {"test_accuracy": knn_accuracy(tr_x, tr_y, te_x, te_y, k=knn_k),
                                 "k": min(knn_k, tr_x.shape[0])}
        elif protocol == "retrieval":
            results[protocol] = retrieval_metrics(te_x, te_y, ks=retrieval_ks, device=device)
        else:
            probes = [p for p in chosen if p in LINEAR_PROTOCOLS] or ["linear"]
            results[protocol] = few_label_probes(
                tr_x, tr_y, te_x, te_y, fractions, probes, linear_epochs=linear_epochs, seed=seed, device=device
            )
    return results
