"""``RelationalReasoning``: a backbone plus a relation head, trained to tell same-image pairs apart."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from relreason.errors import RelreasonError
from relreason.head import RelationHead
from relreason.losses import build_loss
from relreason.methods.base import PretrainMethod, view_list
from relreason.pairing import aggregation_width, gather_pairs, images_per_view_block, shared_pair_indices


@dataclass
class RelationOutput:
    """What one forward pass gives: the loss to minimise and the relation accuracies (fractions in [0, 1]).

    ``accuracy`` is over all pairs, ``positive_accuracy`` and ``negative_accuracy`` over each kind; ``scores`` are
    the pairs' logits ``(P,)`` and ``targets`` their 0/1 targets, in ``relation_pair_indices`` order; ``features``
    the first view's detached backbone features ``(B, d)``. Accuracies are detached tensors on the model's device,
    so reading them costs no host sync until the caller asks for a number.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    positive_accuracy: torch.Tensor
    negative_accuracy: torch.Tensor
    scores: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor | None = None  # detached features of the first view, (B, d)

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """The accuracies under the names the trainer logs."""
        return {
            "relation_accuracy": self.accuracy,
            "positive_accuracy": self.positive_accuracy,
            "negative_accuracy": self.negative_accuracy,
        }


def check_loss_module(loss: object) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss`` when it is a loss to call as ``loss(logits, targets)``; a class given for an instance
    (``loss=FocalLoss``) or a non-callable is a one-line error now rather than at the first step."""
    if isinstance(loss, type):
        raise RelreasonError(f"loss must be a loss module, got the class {loss.__name__}; build one: "
                             f"loss={loss.__name__}(), or pass 'bce' or 'focal'")
    if not callable(loss):
        raise RelreasonError(f"loss must be 'bce', 'focal' or a module called as loss(logits, targets), got "
                             f"{type(loss).__name__}")
    return loss  # a module, or a plain function


def stack_views(views: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, int]:
    """K views as one view-major batch ``(K * B, C, H, W)`` and K.

    Accepts a list of K tensors ``(B, C, H, W)`` (what a K-view dataset's loader yields) or a tensor
    ``(K, B, C, H, W)``.
    """
    if isinstance(views, torch.Tensor):
        if views.dim() != 5:
            raise RelreasonError(
                f"views tensor must have shape (K, B, C, H, W), got {tuple(views.shape)}; "
                "or pass a list of K tensors of shape (B, C, H, W)"
            )
        return views.flatten(0, 1), views.shape[0]
    views = view_list(views, "relational")
    if len({tuple(v.shape) for v in views}) != 1:
        raise RelreasonError(f"all views must share one shape, got {sorted({tuple(v.shape) for v in views})}")
    return torch.cat(views, dim=0), len(views)


class RelationalReasoning(PretrainMethod):
    """Backbone + relation head. ``forward(views)`` returns the loss and relation accuracies.

    Args:
        backbone: any module mapping ``(N, C, H, W)`` images to ``(N, d)`` features.
        feature_dim: ``d``; read from ``backbone.feature_dim`` or inferred with a dummy forward pass.
        aggregation: ``cat`` (default), ``sum``, ``mean`` or ``max``.
        hidden_features: width of the relation head's hidden layer (256 in the paper).
        loss: ``"bce"``, ``"focal"`` or any module or function ``loss(logits, targets)`` giving a 0-d tensor.
        image_size: input size used only when ``feature_dim`` must be inferred.
        factorised_head: score pairs with ``RelationHead.score_pairs`` (the first Linear once per view, not
            once per pair). Same outputs and gradients up to float rounding; ``False`` forms every pair vector
            as the reference does.
    """

    name = "relational"

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int | None = None,
        aggregation: str = "cat",
        hidden_features: int = 256,
        loss: str | nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "bce",
        image_size: int = 32,
        factorised_head: bool = True,
    ) -> None:
        super().__init__(backbone, feature_dim, image_size)
        self.aggregation = aggregation
        self.relation_head = self.beside_backbone(
            RelationHead(aggregation_width(self.feature_dim, aggregation), hidden_features)
        )
        self.criterion = build_loss(loss) if isinstance(loss, str) else check_loss_module(loss)
        self.factorised_head = factorised_head

    @staticmethod
    def views_per_image(num_views: int) -> int:
        """All K views of each image: every pair of them is a positive."""
        return num_views

    def relation_scores(self, features: torch.Tensor, num_views: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets of every relation pair formed from view-major ``features``."""
        batch_size = images_per_view_block(features, num_views)
        left, right, targets = shared_pair_indices(num_views, batch_size, features.device)
        if self.factorised_head:
            scores = self.relation_head.score_pairs(features, left, right, self.aggregation)
        else:
            scores = self.relation_head(gather_pairs(features, left, right, self.aggregation)).squeeze(1)
        return scores, targets.to(scores.dtype, copy=True)  # the caller's own: the cached one stays intact

    def forward(self, views: Sequence[torch.Tensor] | torch.Tensor, labels: torch.Tensor | None = None) -> RelationOutput:
        """The loss and accuracies of every relation pair among the views' K blocks.

        ``views`` is a list of K tensors ``(B, C, H, W)`` (the same B images in the same order in each, as a K-view
        dataset's loader yields them) or one tensor ``(K, B, C, H, W)`` (as ``BatchRelationalAugmentation`` makes
        them). ``labels`` are ignored (the method is self-supervised); accepted so every method is called alike.
        """
        images, num_views = stack_views(views)
        features = self.embed(images)
        scores, targets = self.relation_scores(features, num_views)
        # Under autocast the scores may be half precision; the loss is always taken in at least fp32.
        loss_dtype = torch.promote_types(scores.dtype, torch.float32)
        loss = self.criterion(scores.to(loss_dtype), targets.to(loss_dtype))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise RelreasonError(f"the loss must reduce the pairs to one number, got {shape}; give the loss module "
                                 "reduction='mean' (or end its forward with .mean())")
        with torch.no_grad():
            correct = ((scores > 0).to(targets.dtype) == targets).float()
            positive = (targets > 0.5).float()
            accuracy = correct.mean()
            # Sums, not boolean indexing: a masked select must learn its size, which waits for an accelerator.
            positive_accuracy = (correct * positive).sum() / positive.sum()
            negative_accuracy = (correct * (1.0 - positive)).sum() / (1.0 - positive).sum()
        first_view = features[: features.shape[0] // num_views].detach()
        return RelationOutput(loss, accuracy, positive_accuracy, negative_accuracy, scores, targets, first_view)
