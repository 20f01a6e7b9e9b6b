"""The relation head's per-pair tail (BatchNorm1d -> LeakyReLU -> Linear(h, 1)), streamed in cache-sized chunks.

With the factorised head a pair's hidden vector is ``u[left[p]] + v[right[p]]``: two gathered rows of small
per-view tables. Left to autograd, the tail materialises several ``(P, h)`` tensors (the sum, BatchNorm's
output, the activation and their gradients) and each elementwise op streams one of them through memory. At
the paper's K=32 and batch 64 that is 63,488 x 256 floats (65 MB) per buffer: far more than a CPU's cache,
so the tail costs as much as half the backbone. Here the pair rows are rebuilt from the tables a chunk at a
time, and every op of the forward and backward pass runs on a chunk that stays in cache. Nothing of size
``(P, h)`` is kept between forward and backward.

Same outputs, gradients and running statistics as ``BatchNorm1d -> LeakyReLU -> Linear`` on the gathered
sums, up to float rounding (``tests/test_head.py`` checks fp32 and fp64). Training mode only: in eval mode
the tail is an affine map and a LeakyReLU, which the plain modules already do in one pass. A backward pass
that builds a graph (``create_graph=True``, for second derivatives) redoes the plain computation instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeGuard, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# Rows per chunk so that one (rows, h) fp32 chunk is 2 MB: a core's L2 on common x86 parts.
_CHUNK_ELEMENTS = 1 << 19
# Stream the tail only when a (P, h) buffer outgrows a typical last-level cache (measured on a 32 MB-L3 CPU:
# K=32 head forward+backward 213-234 -> 79-106 ms; K=16, whose 16 MB buffers still fit, gains nothing).
STREAM_ABOVE_BYTES = 16 * 2**20


def chunk_rows(hidden: int) -> int:
    return max(1, _CHUNK_ELEMENTS // hidden)


def _pair_chunks(left_table: torch.Tensor, right_table: torch.Tensor, left: torch.Tensor, right: torch.Tensor, rows: int
                 ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each chunk of ``rows`` pairs: its slice, its left and right indices and ``left_table[left] + right_table[right]``."""
    for start in range(0, left.numel(), rows):
        chunk = slice(start, start + rows)
        pair_left, pair_right = left[chunk], right[chunk]
        yield chunk, pair_left, pair_right, left_table.index_select(0, pair_left).add_(right_table.index_select(0, pair_right))


def _affine(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """BatchNorm's output from the normalised values; forward and backward compute it alike, so they agree on
    which side of zero every value lies."""
    return torch.addcmul(beta, x, gamma)


class _StreamedPairTail(torch.autograd.Function):
    """Logits of ``Linear(LeakyReLU(BatchNorm(u[left] + v[right])))`` with BatchNorm on batch statistics.

    Returns ``(logits, batch_mean, batch_var)``; the statistics (biased variance) are for the running
    averages and carry no gradient.
    """

    @staticmethod
    def forward(ctx: Any, left_part: torch.Tensor, right_part: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                bn_weight: torch.Tensor, bn_bias: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
                eps: float, slope: float, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(left_part.dtype, torch.float32)
        num_pairs, (num_views, hidden) = left.numel(), left_part.shape
        with torch.autocast(left_part.device.type, enabled=False):
            u, v = left_part.to(dtype), right_part.to(dtype)
            # Each side's share of the mean, from how often each view appears on that side.
            left_mean = torch.bincount(left, minlength=num_views).to(dtype) @ u / num_pairs
            right_mean = torch.bincount(right, minlength=num_views).to(dtype) @ v / num_pairs
            u, v = u - left_mean, v - right_mean  # centred: z - mean = u[left] + v[right]
            # The variance as a second pass over centred values, not E[z^2] - E[z]^2, which cancels in fp32
            # when the pair sums sit far from zero but close together.
            square_sum = u.new_zeros(hidden)
            for _, _, _, centred in _pair_chunks(u, v, left, right, rows):
                square_sum += centred.mul_(centred).sum(0)
            var = square_sum / num_pairs
            rstd = torch.rsqrt(var + eps)
            x_left, x_right = u * rstd, v * rstd  # the normalised value is x_left[l] + x_right[r]
            gamma, beta = bn_weight.to(dtype), bn_bias.to(dtype)
            w = out_weight.to(dtype).reshape(-1)
            logits = u.new_empty(num_pairs)
            for chunk, _, _, x in _pair_chunks(x_left, x_right, left, right, rows):
                torch.mv(F.leaky_relu_(_affine(x, gamma, beta), slope), w, out=logits[chunk])
            logits += out_bias.to(dtype)
        ctx.save_for_backward(left, right, x_left, x_right, gamma, beta, rstd, w,
                              left_part, right_part, bn_weight, bn_bias, out_weight, out_bias)
        ctx.slope, ctx.rows, ctx.eps = slope, rows, eps
        ctx.dtypes = (left_part.dtype, right_part.dtype, bn_weight.dtype, bn_bias.dtype, out_weight.dtype)
        mean = left_mean + right_mean
        ctx.mark_non_differentiable(mean, var)
        return logits, mean, var

    @staticmethod
    def backward(ctx: Any, grad_logits: torch.Tensor, _grad_mean: Any, _grad_var: Any) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the hand-written pass below builds no graph of its own
            return _differentiable_backward(ctx, grad_logits)
        left, right, x_left, x_right, gamma, beta, rstd, w = ctx.saved_tensors[:8]
        slope, rows = ctx.slope, ctx.rows
        num_pairs, (num_views, hidden) = left.numel(), x_left.shape
        g = grad_logits.to(x_left.dtype)
        # First pass: the sums over pairs that BatchNorm's backward needs. With d = LeakyReLU's slope at y
        # (1 or `slope`), dL/dy = g * w * d, so every sum is a matrix-vector product with g.
        g_positive = x_left.new_zeros(hidden)  # sum of g where y > 0
        g_x = x_left.new_zeros(hidden)  # sum of g * x
        g_x_positive = x_left.new_zeros(hidden)  # sum of g * x where y > 0
        g_activation = x_left.new_zeros(hidden)  # sum of g * LeakyReLU(y): the last Linear's weight gradient
        for chunk, _, _, x in _pair_chunks(x_left, x_right, left, right, rows):
            g_chunk = g[chunk]
            y = _affine(x, gamma, beta)
            positive = (y > 0).to(x.dtype)
            g_positive += g_chunk @ positive
            g_x += g_chunk @ x
            g_x_positive += g_chunk @ x.mul_(positive)
            g_activation += g_chunk @ F.leaky_relu_(y, slope)
        g_sum = g.sum()
        g_d = slope * g_sum + (1 - slope) * g_positive  # sum of g * d
        grad_beta = w * g_d
        grad_gamma = w * (slope * g_x + (1 - slope) * g_x_positive)  # sum of dL/dy * x
        # dL/dz = gamma * rstd * (dL/dy - mean(dL/dy) - x * mean(dL/dy * x)), taken apart into terms in g, x and y > 0.
        scale = gamma * rstd
        per_g = scale * w * slope
        per_g_positive = scale * w * (1 - slope)
        per_x = scale * grad_gamma / num_pairs
        constant = -scale * grad_beta / num_pairs
        grad_left, grad_right = x_left.new_zeros(num_views, hidden), x_left.new_zeros(num_views, hidden)
        for chunk, pair_left, pair_right, x in _pair_chunks(x_left, x_right, left, right, rows):
            g_chunk = g[chunk, None]
            positive = _affine(x, gamma, beta).gt_(0)
            grad_z = torch.addcmul(constant, g_chunk, per_g).addcmul_(positive, g_chunk * per_g_positive)
            grad_z.sub_(x.mul_(per_x))
            grad_left.index_add_(0, pair_left, grad_z)
            grad_right.index_add_(0, pair_right, grad_z)
        left_dtype, right_dtype, gamma_dtype, beta_dtype, weight_dtype = ctx.dtypes
        return (
            grad_left.to(left_dtype),
            grad_right.to(right_dtype),
            None,
            None,
            grad_gamma.to(gamma_dtype),
            grad_beta.to(beta_dtype),
            g_activation.reshape(1, hidden).to(weight_dtype),
            g_sum.reshape(1).to(weight_dtype),
            None,
            None,
            None,
        )


def _differentiable_backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The tail's gradients as a graph (for second derivatives, e.g. a gradient penalty): the plain modules'
    computation redone on whole ``(P, h)`` tensors from the saved inputs and differentiated by autograd."""
    left, right = ctx.saved_tensors[:2]
    inputs = ctx.saved_tensors[8:]  # left_part, right_part, bn_weight, bn_bias, out_weight, out_bias
    left_part, right_part, bn_weight, bn_bias, out_weight, out_bias = inputs
    hidden = left_part.index_select(0, left) + right_part.index_select(0, right)
    normalised = F.batch_norm(hidden, None, None, bn_weight, bn_bias, training=True, eps=ctx.eps)
    logits = F.linear(F.leaky_relu(normalised, ctx.slope), out_weight, out_bias).squeeze(1)
    wanted = [i for i, tensor in enumerate(inputs) if tensor.requires_grad]
    grads = torch.autograd.grad(logits, [inputs[i] for i in wanted], grad_logits, create_graph=True, allow_unused=True)
    result: list[torch.Tensor | None] = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    left_grad, right_grad, gamma_grad, beta_grad, weight_grad, bias_grad = result
    return left_grad, right_grad, None, None, gamma_grad, beta_grad, weight_grad, bias_grad, None, None, None


def streamed_pair_tail(
    left_part: torch.Tensor,
    right_part: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    batch_norm: nn.BatchNorm1d,
    negative_slope: float,
    last: nn.Linear,
) -> torch.Tensor:
    """Logits ``(P,)`` of ``last(LeakyReLU(batch_norm(left_part[left] + right_part[right])))``, batch_norm training.

    Updates ``batch_norm``'s running statistics as ``BatchNorm1d`` does (unbiased variance, ``momentum`` or the
    cumulative average when it is ``None``).
    """
    logits, mean, var = _StreamedPairTail.apply(
        left_part, right_part, left, right, batch_norm.weight, batch_norm.bias, last.weight, last.bias,
        batch_norm.eps, negative_slope, chunk_rows(left_part.shape[1]),
    )
    running_mean, running_var, batches = batch_norm.running_mean, batch_norm.running_var, batch_norm.num_batches_tracked
    if batch_norm.track_running_stats and running_mean is not None and running_var is not None and batches is not None:
        with torch.no_grad():
            batches.add_(1)
            momentum = batch_norm.momentum
            if momentum is None:
                momentum = 1.0 / float(batches)
            num_pairs = left.numel()
            unbiased = var * (num_pairs / max(num_pairs - 1, 1))
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    return logits


def is_plain(module: nn.Module, kind: type[ModuleT]) -> TypeGuard[ModuleT]:
    """Exactly ``kind`` (not a subclass with its own forward), without hooks of its own or global module hooks:
    the fast paths call functions, not the module, so they would bypass all of these."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                    "_global_backward_pre_hooks")
    return (
        type(module) is kind
        and not any(getattr(module, name, None) for name in hooks)
        and not any(getattr(torch.nn.modules.module, name, None) for name in global_hooks)
    )


def can_stream(features: torch.Tensor, batch_norm: nn.Module, activation: nn.Module, last: nn.Module, num_pairs: int) -> bool:
    """Whether ``streamed_pair_tail`` computes exactly what ``last(activation(batch_norm(hidden)))`` would.

    That needs the stock modules (a training-mode affine BatchNorm1d, a LeakyReLU, a Linear to one logit with a
    bias) without hooks, CPU fp32/fp64 features outside autocast and compile, and at least two pairs (one
    pair is an error for BatchNorm, which the plain modules report).
    """
    return (
        num_pairs > 1
        and features.device.type == "cpu"
        and features.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and is_plain(batch_norm, nn.BatchNorm1d)
        and batch_norm.training
        and batch_norm.affine
        and is_plain(activation, nn.LeakyReLU)
        and is_plain(last, nn.Linear)
        and last.out_features == 1
        and last.bias is not None
    )
