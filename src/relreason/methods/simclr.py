"""SimCLR baseline (Chen et al. 2020): pull two views of an image together, push all other images away."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from relreason.errors import RelreasonError
from relreason.methods.base import PretrainMethod, StepOutput, view_list


def nt_xent_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2B x 2B NT-Xent logits (cosine similarity / T, self-similarity masked out) and each anchor's positive.

    Rows are view-major: anchor ``i < B`` is view 1 of image ``i``, anchor ``B + i`` its view 2, so the
    positive of anchor ``i`` is ``(i + B) mod 2B``. Computed in at least float32, whatever autocast gave.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise RelreasonError(
            f"NT-Xent needs two projections of equal shape (B, p), got {tuple(z1.shape)} and {tuple(z2.shape)}; "
            "pass one row per image for each view"
        )
    if not temperature > 0:
        raise RelreasonError(f"the NT-Xent temperature must be positive, got {temperature}; use e.g. 0.5")
    loss_dtype = torch.promote_types(z1.dtype, torch.float32)
    # Autocast off: it would run the similarity matmul in half precision again, after the cast to fp32.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2], dim=0).to(loss_dtype), dim=1)
        logits = z @ z.t() / temperature
    n = z.shape[0]
    # -inf, not a large negative number: exp(-inf) is exactly 0, so the self term leaves the denominator
    # entirely; each row keeps its finite positive, so the log-sum-exp stays finite.
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (torch.arange(n, device=z.device) + n // 2) % n
    return logits, positives


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy, averaged over all 2B anchors.

    For anchor i with positive p: ``-log(exp(s_ip / T) / sum_{k != i} exp(s_ik / T))``, where ``s`` is the
    cosine similarity of the L2-normalised rows of ``cat(z1, z2)``.
    """
    logits, positives = nt_xent_logits(z1, z2, temperature)
    return F.cross_entropy(logits, positives)


def contrastive_accuracy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Fraction of anchors whose most similar other sample is their positive (detached)."""
    with torch.no_grad():
        return (logits.argmax(dim=1) == positives).float().mean()


class SimCLR(PretrainMethod):
    """Backbone + projection head trained with NT-Xent on two views of each image.

    Args:
        backbone: any module mapping ``(N, C, H, W)`` images to ``(N, d)`` features.
        feature_dim: ``d``; read from ``backbone.feature_dim`` or inferred with a dummy batch when None.
        temperature: NT-Xent's ``T`` (0.5 in the SimCLR paper's CIFAR-10 runs).
        projection_dim: width of the projection the loss sees (128 in the paper).
    """

    name = "simclr"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int | None = None,
        temperature: float = 0.5,
        projection_dim: int = 128,
        image_size: int = 32,
    ) -> None:
        super().__init__(backbone, feature_dim, image_size)
        if not temperature > 0:
            raise RelreasonError(f"the SimCLR temperature must be positive, got {temperature}; use e.g. 0.5")
        self.temperature = float(temperature)
        # The SimCLR paper's 2-layer MLP projection head; the loss is taken on its output, while downstream
        # tasks use the backbone features before it.
        self.projection_head = self.beside_backbone(nn.Sequential(
            nn.Linear(self.feature_dim, self.feature_dim),
            nn.BatchNorm1d(self.feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(self.feature_dim, projection_dim),
        ))

    @staticmethod
    def views_per_image(num_views: int) -> int:
        """Always two: NT-Xent is defined on pairs of views, whatever K the user chose for other methods."""
        return 2

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> StepOutput:
        """``labels`` are ignored (the method is self-supervised); accepted so every method is called alike."""
        views = view_list(views, "simclr")
        if len(views) != 2:
            raise RelreasonError(f"simclr needs exactly 2 views per image, got {len(views)}; pass two augmented views")
        if views[0].shape != views[1].shape:
            raise RelreasonError(
                f"both views must share one shape, got {tuple(views[0].shape)} and {tuple(views[1].shape)}; "
                "crop both views to the same size"
            )
        batch_size = views[0].shape[0]
        if batch_size < 2:
            raise RelreasonError(
                "a batch of one image has no negatives for NT-Xent (its loss is 0); use a batch of at least 2 images"
            )
        # One backbone call on both views, so BatchNorm normalises them with the same batch statistics.
        features = self.embed(torch.cat(views, dim=0))
        projections = self.projection_head(features)
        logits, positives = nt_xent_logits(projections[:batch_size], projections[batch_size:], self.temperature)
        loss = F.cross_entropy(logits, positives)
        metrics = {"contrastive_accuracy": contrastive_accuracy(logits, positives)}
        return StepOutput(loss, metrics, features[:batch_size].detach())
