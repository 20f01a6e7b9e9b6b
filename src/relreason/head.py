"""The relation head: a small MLP that scores an aggregated pair as same-image (1) or not (0)."""

from __future__ import annotations

from torch import nn


class RelationHead(nn.Sequential):
    """Linear(in, hidden) -> BatchNorm1d -> LeakyReLU -> Linear(hidden, 1).

    Kept deliberately weak: a head that can separate pairs on its own teaches the backbone nothing.
    A ``Sequential`` so that its state_dict keys (``0.weight``, ``1.running_mean``, ...) match the
    reference implementation's ``relation_head``.
    """

    def __init__(self, in_features: int, hidden_features: int = 256, negative_slope: float = 0.01) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_features),
            nn.BatchNorm1d(hidden_features),
            nn.LeakyReLU(negative_slope),
            nn.Linear(hidden_features, 1),
        )
        self.in_features = in_features
        self.hidden_features = hidden_features
