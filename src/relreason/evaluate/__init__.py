"""``relreason evaluate``: judge a pretrained backbone by what its features make easy, against a random one.

The protocols are :mod:`relreason.protocols` (re-exported here, with :data:`PROTOCOLS` the default set and
:data:`ALL_PROTOCOLS` every name); this package is the job that runs them on a run's weights:
:mod:`~relreason.evaluate.config` (options), :mod:`~relreason.evaluate.weights` (what to evaluate),
:mod:`~relreason.evaluate.data` (the labelled images and the feature cache), :mod:`~relreason.evaluate.job`
(``run_evaluation``) and :mod:`~relreason.evaluate.report` (tables and JSON).
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
