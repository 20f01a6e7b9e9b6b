"""What the trainer needs from a pretraining method, so one loop serves them all."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from relreason.backbones.feature_dim import infer_feature_dim
from relreason.checks import check_positive_int
from relreason.errors import RelreasonError, short_reason

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass
class StepOutput:
    """One training step's result.

    ``loss`` is minimised; ``metrics`` are detached scalar tensors on the device (accuracies as fractions
    in [0, 1]), logged per epoch under their names; ``features`` are the detached backbone features of the
    first view, ``(B, d)``, which the online probe learns from.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None


class StepResult(Protocol):
    """What the trainer reads of a forward pass: a ``StepOutput``, or an object with the same attributes, such as
    relational reasoning's ``RelationOutput``."""

    @property
    def loss(self) -> torch.Tensor: ...

    @property
    def metrics(self) -> Mapping[str, torch.Tensor]: ...

    @property
    def features(self) -> torch.Tensor | None: ...


class PretrainMethod(nn.Module):
    """A pretraining objective over ``self.backbone``.

    ``forward(views, labels)`` takes a list of ``views_per_image(K)`` tensors ``(B, C, H, W)`` (the views of
    the same B images, in the same order) and their labels ``(B,)`` (-1 where unknown) and returns a
    ``StepOutput``. Subclasses set ``name`` and, when they train on labels, ``needs_labels = True``.
    """

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    #: Whether a method that trains on labels checks their values in each step (which waits for the device); the
    #: trainer checks them once beforehand and turns this off.
    check_label_values: bool = True

    def __init__(self, backbone: nn.Module, feature_dim: int | None = None, image_size: int = 32) -> None:
        super().__init__()
        if feature_dim is None:  # read from the backbone, else found with a dummy batch of image_size images
            feature_dim = getattr(backbone, "feature_dim", None) or infer_feature_dim(backbone, image_size)
        self.backbone = backbone
        self.feature_dim = check_positive_int(feature_dim, "feature_dim (the backbone's output width)", example=64)

    @staticmethod
    def views_per_image(num_views: int) -> int:
        """How many augmented views of each image a step needs, given the user's K."""
        return 1

    def beside_backbone(self, module: ModuleT) -> ModuleT:
        """``module`` moved to the backbone's device and floating dtype, so that a head built for a backbone
        already on a GPU, or in float64, runs with it."""
        tensors = [*self.backbone.parameters(), *self.backbone.buffers()]
        if not tensors:
            return module
        floating = next((t for t in tensors if t.is_floating_point()), None)
        return module.to(device=tensors[0].device, dtype=floating.dtype if floating is not None else None)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features of ``images``, checked to be one ``feature_dim``-wide row per image."""
        try:
            features = self.backbone(images)
        except RuntimeError as error:
            fix = _how_to_fix_views(images, self.backbone, error)
            if fix is None:
                raise
            what = "these views" if images.is_floating_point() else f"{images.dtype} views"
            raise RelreasonError(f"the backbone cannot take {what} ({short_reason(error)}); {fix}") from error
        check_features(features, images.shape[0], self.feature_dim)
        return features

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor | None = None) -> StepResult:
        raise NotImplementedError


def _how_to_fix_views(images: torch.Tensor, backbone: nn.Module, error: RuntimeError) -> str | None:
    """The fix for the view mistakes a backbone's first layer reports in PyTorch's words, or None for any other
    error, which is then raised as it is."""
    if not images.is_floating_point():
        return ("make normalised float views from uint8 images with "
                "relreason.data.batch_augment.BatchRelationalAugmentation or a transform ending in Normalize")
    shape = tuple(images.shape)
    # Only the first layer's complaint about the views themselves: one about a later layer is the backbone's own.
    if "channels" in str(error) and f"input[{', '.join(map(str, shape))}]" in str(error):
        fix = "views are (N, C, H, W) with the channels the backbone takes"
        if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
            return f"{fix}, and these {shape} look channels-last: pass views.movedim(-1, -3)"
        if images.shape[1] == 1:
            return f"{fix}, and these {shape} are grey: pass views.repeat_interleave(3, dim=-3) for RGB"
        return f"{fix}, got {shape}"
    weight = next((t for t in backbone.parameters() if t.is_floating_point()), None)
    if weight is not None and weight.dtype != images.dtype and not torch.is_autocast_enabled(images.device.type):
        return (f"the views are {images.dtype} and the backbone {weight.dtype}; convert the views "
                f"(views.to({weight.dtype})) or the model (model.to(dtype)), or run under torch.autocast")
    return None


def check_features(features: torch.Tensor, num_images: int, feature_dim: int) -> None:
    """A one-line error unless the backbone gave one ``feature_dim``-wide row per image: a dropped or extra row
    would silently pair the wrong views."""
    shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape != (num_images, feature_dim):
        raise RelreasonError(
            f"the backbone turned {num_images} images into features of shape {shape}, expected "
            f"({num_images}, {feature_dim}); it must return one feature_dim-wide row per image "
            "(end it with global pooling and flatten, or fix feature_dim)"
        )


def view_list(views: Sequence[torch.Tensor] | torch.Tensor, method: str) -> list[torch.Tensor]:
    """``views`` as a list of image batches ``(B, C, H, W)``, or a one-line error naming the mistake.

    Takes a list of K such tensors (what a K-view loader yields), a tensor ``(K, B, C, H, W)``, or a single
    batch ``(B, C, H, W)`` as one view.
    """
    if isinstance(views, torch.Tensor):
        if views.dim() not in (4, 5):
            raise RelreasonError(
                f"{method}: a views tensor must have shape (K, B, C, H, W) or (B, C, H, W), got {tuple(views.shape)}"
            )
        views = [views] if views.dim() == 4 else list(views.unbind(0))
    elif isinstance(views, (list, tuple)) and len(views) == 2 and isinstance(views[0], (list, tuple)):
        raise RelreasonError(
            f"{method} got a loader's whole (views, labels) batch as its views; unpack it: "
            "views, labels = batch; model(views, labels)"
        )
    else:
        views = list(views)
    if not views:
        raise RelreasonError(f"{method}: no views given; pass a list of tensors of shape (B, C, H, W)")
    if not all(isinstance(v, torch.Tensor) for v in views):
        kinds = sorted({type(v).__name__ for v in views})
        raise RelreasonError(f"{method}: views must be tensors of shape (B, C, H, W), got {', '.join(kinds)}")
    shapes = {tuple(v.shape) for v in views}
    if any(len(shape) != 4 for shape in shapes):
        raise RelreasonError(
            f"{method}: each view must be a batch of images (B, C, H, W), got shapes {sorted(shapes)}; "
            "add the batch axis with view.unsqueeze(0) for a single image"
        )
    return views


def single_view(views: Sequence[torch.Tensor] | torch.Tensor, method: str) -> torch.Tensor:
    """The one view a single-view method trains on (a list of one, or one ``(B, C, H, W)`` tensor)."""
    views = view_list(views, method)
    if len(views) != 1:
        raise RelreasonError(f"{method} needs exactly 1 view per image, got {len(views)}; pass one view")
    return views[0]


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and detached accuracy (a fraction) of class ``logits`` against ``targets``."""
    # Under autocast the logits may be half precision; the loss is always taken in at least fp32.
    loss_dtype = torch.promote_types(logits.dtype, torch.float32)
    loss = F.cross_entropy(logits.to(loss_dtype), targets)
    with torch.no_grad():
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
    return loss, accuracy
