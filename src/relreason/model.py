"""Kept importable for code written against earlier versions: ``RelationalReasoning`` lives in
:mod:`relreason.methods.relational` (and at the top level, ``relreason.RelationalReasoning``)."""

from relreason.backbones.feature_dim import infer_feature_dim  # noqa: F401
from relreason.methods.relational import RelationalReasoning, RelationOutput, stack_views  # noqa: F401
