"""The evaluation protocols beyond frozen-feature probes: fine-tuning, few labels and retrieval.

:mod:`relreason.evaluate` imports and re-exports these; ``relreason evaluate --protocols``
selects them.
"""

from relreason.protocols.few_label import (
    check_label_fractions,
    few_label_indices,
    fraction_key,
    fraction_name,
)
from relreason.protocols.finetune import (
    FINETUNE_MILESTONES,
    fine_tune,
    finetune_milestones,
    finetune_transform,
)
from relreason.protocols.retrieval import plot_retrieval, retrieval_metrics

__all__ = [
    "FINETUNE_MILESTONES",
    "check_label_fractions",
    "few_label_indices",
    "fine_tune",
    "finetune_milestones",
    "finetune_transform",
    "fraction_key",
    "fraction_name",
    "plot_retrieval",
    "retrieval_metrics",
]
