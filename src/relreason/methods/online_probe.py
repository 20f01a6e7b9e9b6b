"""A linear classifier trained alongside pretraining on detached features: representation quality, live."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OnlineProbe(nn.Module):
    """Linear(d, classes) on the first view's detached, standardised features; images labelled -1 are left out.

    Its gradient never reaches the backbone, so the method trains exactly as without it. The features are
    standardised (BatchNorm without learnt scale) because their scale drifts during pretraining and a
    plain linear layer would then lag behind what the features can do.
    """

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.standardise = nn.BatchNorm1d(feature_dim, affine=False)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (0 with a zero gradient when no image is labelled) and accuracy over the labelled images."""
        logits = self.classifier(self.standardise(features.detach().float()))
        labelled = (labels >= 0).float()
        count = labelled.sum().clamp(min=1)
        # Masked rather than filtered, so every rank always gets a gradient (DDP needs one per parameter).
        loss = (F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * labelled).sum() / count
        with torch.no_grad():
            accuracy = ((logits.argmax(1) == labels).float() * labelled).sum() / count
        return loss, accuracy
