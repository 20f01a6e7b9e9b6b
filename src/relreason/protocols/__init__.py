"""Evaluation protocols, each usable alone: frozen-feature probes (linear, converged linear, k-NN,
retrieval, few labels) and fine-tuning.

:func:`extract_features` runs a frozen backbone once; the probes take its ``(features, labels)``;
:func:`evaluate_features` runs a chosen set by name. ``relreason evaluate`` (:mod:`relreason.evaluate`) is one
user of them.
"""

from relreason.protocols.features import extract_features
from relreason.protocols.few_label import check_label_fractions, few_label_indices, fraction_key, fraction_name
from relreason.protocols.finetune import FINETUNE_MILESTONES, fine_tune, finetune_milestones, finetune_transform
from relreason.protocols.frozen import (
    ALL_PROTOCOLS,
    DEFAULT_LABEL_FRACTIONS,
    FEATURE_PROTOCOLS,
    PROTOCOLS,
    evaluate_features,
    few_label_probes,
)
from relreason.protocols.knn import knn_accuracy, knn_predict
from relreason.protocols.linear import linear_probe, linear_probe_converged, train_linear_classifier
from relreason.protocols.retrieval import plot_retrieval, retrieval_metrics

__all__ = [
    "ALL_PROTOCOLS",
    "DEFAULT_LABEL_FRACTIONS",
    "FEATURE_PROTOCOLS",
    "FINETUNE_MILESTONES",
    "PROTOCOLS",
    "check_label_fractions",
    "evaluate_features",
    "extract_features",
    "few_label_indices",
    "few_label_probes",
    "fine_tune",
    "finetune_milestones",
    "finetune_transform",
    "fraction_key",
    "fraction_name",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "linear_probe_converged",
    "plot_retrieval",
    "retrieval_metrics",
    "train_linear_classifier",
]
