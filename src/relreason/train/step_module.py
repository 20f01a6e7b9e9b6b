"""The module the trainer steps: a method with its optional online probe, and the one-time check of what a
method's step returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from relreason.errors import RelreasonError
from relreason.methods.base import PretrainMethod, StepOutput
from relreason.methods.online_probe import OnlineProbe


class PretrainModule(nn.Module):
    """What one training step runs: the method and, when labels exist, the online probe beside it."""

    def __init__(self, method: PretrainMethod, probe: OnlineProbe | None = None) -> None:
        super().__init__()
        self.method = method
        self.probe = probe
        self.output_checked = False

    def forward(self, views: Sequence[torch.Tensor] | torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, StepOutput]:
        """The loss to minimise (method + probe) and the method's output, its metrics joined by the probe's."""
        out = self.method(views, labels)
        if not self.output_checked:  # once per process: its first step shows what every step returns
            batch_size = labels.shape[0] if labels is not None else None
            check_step_output(out, self.method, batch_size, needs_features=self.probe is not None)
            self.output_checked = True
        metrics = dict(out.metrics)
        total = out.loss
        if self.probe is not None:
            probe_loss, metrics["probe_accuracy"] = self.probe(out.features, labels)
            total = total + probe_loss
        return total, StepOutput(out.loss, metrics, out.features)


def check_step_output(out: Any, method: nn.Module, batch_size: int | None, needs_features: bool) -> None:
    """A one-line error for a step output the trainer cannot use: what a method of one's own may get wrong. Reads
    only shapes and flags, so the step does not wait for the device."""
    name = type(method).__name__
    if not all(hasattr(out, field) for field in ("loss", "metrics", "features")):  # a StepOutput, or alike
        raise RelreasonError(f"method {name}'s forward returned {type(out).__name__}; return "
                             "relreason.methods.StepOutput(loss, metrics, features)")
    loss = out.loss
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        loss_shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise RelreasonError(f"method {name}'s StepOutput.loss must be a 0-d tensor, got {loss_shape}; reduce it "
                             "(e.g. .mean())")
    if torch.is_grad_enabled() and method.training and not loss.requires_grad:
        raise RelreasonError(f"method {name}'s loss does not depend on any parameter (was it detached?); nothing "
                             "would train")
    if not isinstance(out.metrics, Mapping):
        raise RelreasonError(f"method {name}'s StepOutput.metrics must be a dict of name: 0-d tensor, got "
                             f"{type(out.metrics).__name__}")
    wrong = [key for key, value in out.metrics.items() if not isinstance(value, torch.Tensor) or value.dim() != 0]
    if wrong:
        raise RelreasonError(f"method {name}'s metrics {', '.join(map(repr, wrong))} must be 0-d tensors "
                             "(detached, on the device), so that no step waits for them")
    taken = sorted(set(out.metrics) & {"loss", "probe_accuracy"})
    if taken:
        raise RelreasonError(f"method {name}'s metric name {taken[0]!r} is the trainer's own; name it otherwise")
    if needs_features:
        features = out.features
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else None
        feature_dim = getattr(method, "feature_dim", None)
        if shape is None or len(shape) != 2 or batch_size not in (None, shape[0]) or shape[1] != feature_dim:
            got = f"shaped {shape}" if shape is not None else type(features).__name__
            raise RelreasonError(f"method {name}'s StepOutput.features must be the first view's detached backbone "
                                 f"features, ({batch_size}, {feature_dim}), which the online probe learns from; got "
                                 f"{got} (or pass --no-online-probe)")
