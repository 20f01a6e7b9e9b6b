"""Losses for the relation head's logits against 0/1 pair targets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from relreason.checks import real_number
from relreason.errors import RelreasonError

LOSSES = ("bce", "focal")


def check_focal_parameters(gamma: float, alpha: float | None, gamma_name: str = "focal loss gamma",
                           alpha_name: str = "focal loss alpha") -> None:
    """A one-line error, naming the parameter as ``gamma_name`` / ``alpha_name`` say (the command line names its
    flags), for a focal loss ``gamma`` that is not a finite number >= 0 or an ``alpha`` outside [0, 1]."""
    if not (real_number(gamma, gamma_name) >= 0 and math.isfinite(gamma)):  # NaN passes a plain `gamma < 0` check
        raise RelreasonError(f"{gamma_name} must be a finite number >= 0, got {gamma}; pass e.g. 2 (the paper's)")
    if alpha is not None and not 0.0 <= real_number(alpha, alpha_name) <= 1.0:  # also refuses NaN and infinities
        raise RelreasonError(f"{alpha_name} must lie in [0, 1], got {alpha}; pass e.g. 0.5")


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017), averaged over pairs.

    ``alpha`` weighs positives (``1 - alpha`` negatives); ``gamma`` down-weights easy pairs. The paper's
    code uses ``gamma=2, alpha=0.5``; ``gamma=0, alpha=0.5`` is half the BCE.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.5) -> None:
        super().__init__()
        check_focal_parameters(gamma, alpha)
        self.gamma = gamma
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean focal loss (a 0-d tensor) of ``logits`` against ``targets`` of the same shape: 1 for a positive
        pair, 0 for a negative one, or a soft target in between."""
        cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        # (1 - p_true) ** gamma in log space: 1 - sigmoid(z) rounds to 0 from |z| ~ 17 in fp32, where the
        # derivative of x ** gamma is infinite for gamma < 1 and the gradient would be NaN.
        hard = (targets == 0) | (targets == 1)
        log_miss_hard = F.logsigmoid(torch.where(targets == 1, -logits, logits))
        # A soft target blends both terms. On a 0/1 target that blend takes log(0), whose second derivative (a
        # gradient penalty's) is NaN even where it is not selected, so there it runs on a stand-in target.
        soft = torch.where(hard, torch.full_like(targets, 0.5), targets)
        log_miss_soft = torch.logaddexp(soft.log() + F.logsigmoid(-logits), (-soft).log1p() + F.logsigmoid(logits))
        log_miss = torch.where(hard, log_miss_hard, log_miss_soft)
        loss = torch.exp(self.gamma * log_miss) * cross_entropy
        if self.alpha is not None:
            loss = (targets * self.alpha + (1 - targets) * (1 - self.alpha)) * loss
        return loss.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}"


def build_loss(name: str = "bce", gamma: float = 2.0, alpha: float | None = 0.5) -> nn.Module:
    """``bce`` (BCE with logits, the reference notebook's) or ``focal`` (the paper's code); ``gamma`` and ``alpha``
    are the focal loss's and do not change ``bce``."""
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "focal":
        return FocalLoss(gamma=gamma, alpha=alpha)
    raise RelreasonError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
