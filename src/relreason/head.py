"""The relation head: a small MLP that scores an aggregated pair as same-image (1) or not (0)."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from relreason.checks import check_positive_int
from relreason.errors import RelreasonError
from relreason.pair_tail import STREAM_ABOVE_BYTES, can_stream, is_plain, streamed_pair_tail
from relreason.pairing import aggregation_width, gather_pairs

FACTORISABLE = ("cat", "sum", "mean")


class RelationHead(nn.Sequential):
    """Linear(in, hidden) -> BatchNorm1d -> LeakyReLU -> Linear(hidden, 1).

    Kept deliberately weak: a head that can separate pairs on its own teaches the backbone nothing.
    A ``Sequential`` so that its state_dict keys (``0.weight``, ``1.running_mean``, ...) match the
    reference implementation's ``relation_head``. The LeakyReLU works in place (as torchvision's ResNets'
    ReLUs do): a forward hook on the BatchNorm (``head[1]``) sees its output after the activation; hook the
    LeakyReLU's input (``head[2]``, a pre-hook) for BatchNorm's own output.
    """

    def __init__(self, in_features: int, hidden_features: int = 256, negative_slope: float = 0.01) -> None:
        in_features = check_positive_int(in_features, "the relation head's in_features", example=128)
        hidden_features = check_positive_int(hidden_features, "the relation head's hidden_features", example=256)
        super().__init__(
            nn.Linear(in_features, hidden_features),
            nn.BatchNorm1d(hidden_features),
            nn.LeakyReLU(negative_slope, inplace=True),  # on BatchNorm's fresh output: one (P, h) buffer fewer
            nn.Linear(hidden_features, 1),
        )
        self.in_features = in_features
        self.hidden_features = hidden_features

    def score_pairs(
        self,
        features: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        aggregation: str = "cat",
        stream_tail: bool | None = None,
    ) -> torch.Tensor:
        """Logits ``(P,)`` of the pairs ``(features[left[p]], features[right[p]])`` joined by ``aggregation``.

        Equal to ``self(aggregate_pairs(features[left], features[right], aggregation))`` but, for the linear
        aggregations, the first Linear runs once per view instead of once per pair: ``W [a; b] = W_a a + W_b b``
        and ``W (a + b) = W a + W b``. With K views a feature takes part in 2(K-1) pairs, so this removes a
        factor ~2(K-1) of the head's matrix work and never materialises the ``(P, 2d)`` pair matrix.

        ``stream_tail``: run BatchNorm, LeakyReLU and the last Linear chunk by chunk
        (``relreason.pair_tail``) instead of on whole ``(P, h)`` tensors. ``None`` (default) streams on CPU in
        training, outside autocast, when a ``(P, h)`` buffer would outgrow a typical last-level cache (K=32,
        batch 64); ``False`` never; ``True`` wherever it applies (``pair_tail.can_stream``: the stock modules,
        no hooks, BatchNorm in training mode, fp32/fp64 on CPU).
        """
        if features.dim() != 2:
            raise RelreasonError(
                f"the relation head scores pairs of (N, d) features, got features shaped {tuple(features.shape)}; "
                "flatten the backbone's output to one row per image"
            )
        for name, index in (("left", left), ("right", right)):
            if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int64, torch.int32):
                got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
                raise RelreasonError(f"score_pairs' {name} must be a tensor of integer row indices, got {got}; "
                                     "make left and right with relation_pair_indices(K, B)")
            if index.device != features.device:
                raise RelreasonError(f"score_pairs' {name} indices are on {index.device} and the features on "
                                     f"{features.device}; pass relation_pair_indices(K, B, device=features.device)")
        if left.shape != right.shape:
            raise RelreasonError(f"score_pairs' left and right must be index tensors of one shape, got "
                                 f"{tuple(left.shape)} and {tuple(right.shape)}; pair row left[p] with row right[p]")
        first, width = self[0], features.shape[-1]
        weight = getattr(first, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device != features.device:
            raise RelreasonError(f"the relation head is on {weight.device} and the features on {features.device}; "
                                 "move the head with .to(features.device)")
        if (isinstance(weight, torch.Tensor) and weight.dtype != features.dtype and weight.is_floating_point()
                and not torch.is_autocast_enabled(features.device.type)):
            raise RelreasonError(f"the features are {features.dtype} and the relation head {weight.dtype}; convert "
                                 f"one to the other (features.to({weight.dtype}), or the head with .to(dtype)), or run "
                                 "under torch.autocast")
        joined_width = aggregation_width(width, aggregation)
        lazy = isinstance(first, nn.modules.lazy.LazyModuleMixin) and first.has_uninitialized_params()
        if isinstance(first, nn.Linear) and not lazy and first.in_features != joined_width:
            raise RelreasonError(
                f"the relation head takes {first.in_features} inputs but '{aggregation}' of {width}-wide features "
                f"gives {joined_width}; build the head with in_features={joined_width}"
            )
        # max does not factorise; hooks on the head or its first Linear, or a replaced first layer, would be
        # bypassed by the factorised path: the pairs are formed and run through the modules.
        if aggregation not in FACTORISABLE or not (is_plain(self, RelationHead) and is_plain(first, nn.Linear)):
            return self(gather_pairs(features, left, right, aggregation)).squeeze(1)
        if aggregation == "cat":
            # The bias joins the left projection, once per view rather than once per pair (under bf16
            # autocast a per-pair fp32 bias would also turn the whole tail back to fp32: 2x slower).
            left_part = F.linear(features, first.weight[:, :width], first.bias)
            right_part = F.linear(features, first.weight[:, width:])
        else:
            weight = first.weight if aggregation == "sum" else first.weight * 0.5
            left_part, right_part = F.linear(features, weight, first.bias), F.linear(features, weight)
        if stream_tail is None:
            stream_tail = left.numel() * left_part.shape[1] * left_part.element_size() > STREAM_ABOVE_BYTES
        if stream_tail and can_stream(left_part, self[1], self[2], self[3], left.numel()):
            # can_stream has checked that these are the stock modules.
            batch_norm, activation, last = cast(nn.BatchNorm1d, self[1]), cast(nn.LeakyReLU, self[2]), cast(nn.Linear, self[3])
            return streamed_pair_tail(left_part, right_part, left, right, batch_norm, activation.negative_slope, last)
        # index_select, not advanced indexing: its backward (index_add) is deterministic on CPU.
        hidden = left_part.index_select(0, left) + right_part.index_select(0, right)
        return self[3](self[2](self[1](hidden))).squeeze(1)
