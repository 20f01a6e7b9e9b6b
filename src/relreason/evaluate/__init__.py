"""Judge a pretrained backbone by what its features make easy: ``relreason evaluate`` and its protocols.

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

The protocols themselves live in :mod:`relreason.protocols` (re-exported here); this package is the job
that runs them on a run's weights: :mod:`~relreason.evaluate.config` (options),
:mod:`~relreason.evaluate.weights` (what to evaluate), :mod:`~relreason.evaluate.data` (the labelled
images and the feature cache), :mod:`~relreason.evaluate.job` (``run_evaluation``) and
:mod:`~relreason.evaluate.report` (tables and JSON).
"""

from relreason.evaluate.config import EvaluateConfig
from relreason.evaluate.data import check_several_classes, data_tag_of, feature_cache_path, labelled_split
from relreason.evaluate.job import run_evaluation
from relreason.evaluate.report import format_table, write_results_json
from relreason.protocols import (
    ALL_PROTOCOLS,
    DEFAULT_LABEL_FRACTIONS,
    FEATURE_PROTOCOLS,
    PROTOCOLS,
    evaluate_features,
    extract_features,
    few_label_indices,
    few_label_probes,
    fine_tune,
    finetune_transform,
    knn_accuracy,
    knn_predict,
    linear_probe,
    linear_probe_converged,
    plot_retrieval,
    retrieval_metrics,
    train_linear_classifier,
)

__all__ = [
    "ALL_PROTOCOLS",
    "DEFAULT_LABEL_FRACTIONS",
    "FEATURE_PROTOCOLS",
    "PROTOCOLS",
    "EvaluateConfig",
    "check_several_classes",
    "data_tag_of",
    "evaluate_features",
    "extract_features",
    "feature_cache_path",
    "few_label_indices",
    "few_label_probes",
    "fine_tune",
    "finetune_transform",
    "format_table",
    "knn_accuracy",
    "knn_predict",
    "labelled_split",
    "linear_probe",
    "linear_probe_converged",
    "plot_retrieval",
    "retrieval_metrics",
    "run_evaluation",
    "train_linear_classifier",
    "write_results_json",
]
