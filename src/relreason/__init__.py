"""relreason: self-supervised relational reasoning (Patacchiola & Storkey, NeurIPS 2020).

Building blocks, each usable in your own training loop:
``relation_pair_indices`` / ``make_relation_pairs`` (pairing), ``RelationHead`` (head),
``FocalLoss`` / ``build_loss`` (losses), ``RelationalReasoning`` (backbone + head -> loss, accuracies),
``relreason.backbones`` and ``relreason.data`` (K-view datasets and the paper's augmentation).
"""

from relreason.backbones.feature_dim import infer_feature_dim
from relreason.errors import RelreasonError
from relreason.head import RelationHead
from relreason.losses import FocalLoss, build_loss
from relreason.methods.relational import RelationalReasoning, RelationOutput
from relreason.pairing import (
    AGGREGATIONS,
    aggregate_pairs,
    aggregation_width,
    make_relation_pairs,
    relation_pair_indices,
)

__version__ = "0.1.0"

__all__ = [
    "AGGREGATIONS",
    "FocalLoss",
    "RelationHead",
    "RelationOutput",
    "RelationalReasoning",
    "RelreasonError",
    "aggregate_pairs",
    "aggregation_width",
    "build_loss",
    "infer_feature_dim",
    "make_relation_pairs",
    "relation_pair_indices",
]
