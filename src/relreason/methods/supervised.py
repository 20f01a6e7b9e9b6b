"""Supervised baseline: the backbone trained with labels, the paper's upper bound for self-supervision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from relreason.errors import RelreasonError
from relreason.methods.base import PretrainMethod, StepOutput, classification_loss, single_view


class Supervised(PretrainMethod):
    """Backbone + linear classifier trained with cross entropy on the class labels.

    Args:
        backbone: any module mapping ``(N, C, H, W)`` images to ``(N, d)`` features.
        feature_dim: ``d``; read from ``backbone.feature_dim`` or inferred with a dummy batch when None.
        num_classes: number of classes; labels must lie in ``[0, num_classes)``.
    """

    name = "supervised"
    needs_labels = True

    def __init__(
        self, backbone: nn.Module, feature_dim: int | None = None, num_classes: int | None = None, image_size: int = 32
    ) -> None:
        super().__init__(backbone, feature_dim, image_size)
        if num_classes is None:
            raise RelreasonError("supervised pretraining needs num_classes=, the number of classes in the labels")
        if num_classes < 2:
            raise RelreasonError(f"supervised pretraining needs at least 2 classes, got {num_classes}")
        self.num_classes = int(num_classes)
        self.classifier = self.beside_backbone(nn.Linear(self.feature_dim, self.num_classes))
        # The trainer checks the whole dataset's labels once and turns the per-step check off.
        self.check_label_values = True

    @staticmethod
    def views_per_image(num_views: int) -> int:
        return 1

    def check_labels(self, labels: torch.Tensor, batch_size: int) -> None:
        """Refuse unknown (-1) or out-of-range labels with a readable error.

        Costs one host sync per step on an accelerator; without it, cross entropy on a bad label fails
        with an index error on CPU and a device-side assert on CUDA, neither naming the cause. With
        ``check_label_values`` off (labels checked beforehand, as the trainer does) only the shape is checked.
        """
        if labels.shape != (batch_size,):
            raise RelreasonError(
                f"labels must have shape ({batch_size},), one per image, got {tuple(labels.shape)}"
            )
        if self.check_label_values and bool(((labels < 0) | (labels >= self.num_classes)).any()):
            if bool((labels < 0).any()):
                raise RelreasonError(
                    "supervised pretraining needs labels for every image; choose a labelled dataset/split"
                )
            raise RelreasonError(
                f"a label is >= num_classes ({self.num_classes}); build the method with the dataset's class count"
            )

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        images = single_view(views, "supervised")
        if labels is None:
            raise RelreasonError("supervised pretraining needs labels for every image; choose a labelled dataset/split")
        self.check_labels(labels, images.shape[0])
        features = self.embed(images)
        loss, accuracy = classification_loss(self.classifier(features), labels)
        return StepOutput(loss, {"train_accuracy": accuracy}, features.detach())
