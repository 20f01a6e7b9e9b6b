"""Evaluation protocols, each usable alone on a frozen backbone's features or on the backbone itself.

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

:func:`extract_features` runs a frozen backbone once; :func:`evaluate_features` runs a chosen set of the
feature protocols by name. ``relreason evaluate`` (:mod:`relreason.evaluate`) is one user of them.
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
