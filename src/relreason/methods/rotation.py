"""Rotation prediction baseline (Gidaris et al. 2018): classify which of 4 quarter turns was applied."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from relreason.errors import RelreasonError
from relreason.methods.base import PretrainMethod, StepOutput, classification_loss, single_view

NUM_ROTATIONS = 4


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image at 0, 90, 180 and 270 degrees, and the rotation labels.

    Rotation ``k`` is ``torch.rot90(images, k, dims=(2, 3))``: k quarter turns counter-clockwise as the
    image is displayed (row 0 at the top), so the top-right pixel goes to the top-left for k = 1. The result
    is rotation-major, ``(4B, C, H, W)``: rows ``k*B .. k*B + B - 1`` are all B images turned k times, with
    label k. Rotation 0 comes first, so the first B rows are the images unchanged.
    """
    if images.dim() != 4:
        raise RelreasonError(f"rotate_batch needs images of shape (B, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[2], images.shape[3]
    if height != width:
        raise RelreasonError(
            f"rotation prediction needs square images, got {height}x{width} (a quarter turn would change the "
            "shape); crop or resize to a square"
        )
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)], dim=0)
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


class RotationPrediction(PretrainMethod):
    """Backbone + linear 4-way classifier of the rotation applied to each image.

    Args:
        backbone: any module mapping ``(N, C, H, W)`` images to ``(N, d)`` features.
        feature_dim: ``d``; read from ``backbone.feature_dim`` or inferred with a dummy batch when None.
    """

    name = "rotation"

    def __init__(self, backbone: nn.Module, feature_dim: int | None = None, image_size: int = 32) -> None:
        super().__init__(backbone, feature_dim, image_size)
        self.rotation_head = self.beside_backbone(nn.Linear(self.feature_dim, NUM_ROTATIONS))

    @staticmethod
    def views_per_image(num_views: int) -> int:
        """One view; the four rotations are made here, not by the data pipeline."""
        return 1

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        """``labels`` are ignored (the rotations are the targets); accepted so every method is called alike."""
        images = single_view(views, "rotation")
        rotated, targets = rotate_batch(images)
        # All 4B rotated images in one backbone call, so BatchNorm sees every rotation in one batch.
        features = self.embed(rotated)
        loss, accuracy = classification_loss(self.rotation_head(features), targets)
        batch_size = images.shape[0]
        # Rotation 0 comes first, so the first B rows are the features of the unrotated view.
        return StepOutput(loss, {"rotation_accuracy": accuracy}, features[:batch_size].detach())
