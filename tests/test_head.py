"""The factorised relation head against the plain one: pair vectors formed, then the whole head applied."""

import copy

import pytest
import torch

from loop_reference import loop_aggregate
from relreason import RelationHead, RelreasonError
from relreason.pairing import aggregation_width, relation_pair_indices


def plain_scores(head, features, num_views, aggregation):
    pairs, _ = loop_aggregate(features, num_views, aggregation)
    return head(pairs).squeeze(1)


@pytest.mark.parametrize("aggregation", ["cat", "sum", "mean", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_views,batch_size", [(2, 2), (4, 7), (16, 5)])
def test_score_pairs_equals_plain_head(aggregation, dtype, num_views, batch_size):
    torch.manual_seed(3)
    dim = 12
    fast_head = RelationHead(aggregation_width(dim, aggregation), hidden_features=32).to(dtype)
    with torch.no_grad():  # non-trivial affine BatchNorm parameters
        fast_head[1].weight.uniform_(0.5, 1.5)
        fast_head[1].bias.uniform_(-0.5, 0.5)
    plain_head = copy.deepcopy(fast_head)
    features = torch.randn(num_views * batch_size, dim, dtype=dtype)
    fast_features = features.clone().requires_grad_()
    plain_features = features.clone().requires_grad_()
    weights = torch.randn(num_views * (num_views - 1) * batch_size, dtype=dtype)  # a loss that weighs every pair

    left, right, _ = relation_pair_indices(num_views, batch_size)
    fast = fast_head.score_pairs(fast_features, left, right, aggregation)
    plain = plain_scores(plain_head, plain_features, num_views, aggregation)
    (fast * weights).sum().backward()
    (plain * weights).sum().backward()

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    assert fast.shape == plain.shape == (num_views * (num_views - 1) * batch_size,)
    assert torch.allclose(fast, plain, **tol)
    assert torch.allclose(fast_features.grad, plain_features.grad, **tol)
    for (name, a), b in zip(fast_head.named_parameters(), plain_head.parameters()):
        assert torch.allclose(a.grad, b.grad, **tol), name
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(fast_head[1], name), getattr(plain_head[1], name), **tol), name
    assert fast_head[1].num_batches_tracked == plain_head[1].num_batches_tracked == 1


def test_score_pairs_in_eval_mode_uses_running_statistics():
    torch.manual_seed(0)
    head = RelationHead(8, 16)
    head(torch.randn(50, 8))  # move the running statistics away from their initial values
    head.eval()
    features = torch.randn(12, 4)
    left, right, _ = relation_pair_indices(3, 4)
    expected = plain_scores(head, features, 3, "cat")
    assert torch.allclose(head.score_pairs(features, left, right, "cat"), expected, atol=1e-6)


def test_score_pairs_refuses_mismatched_width():
    head = RelationHead(10)
    left, right, _ = relation_pair_indices(2, 3)
    with pytest.raises(RelreasonError, match="in_features=8"):
        head.score_pairs(torch.randn(6, 4), left, right, "cat")


def test_score_pairs_under_bf16_autocast_stays_low_precision_and_close_to_the_plain_head():
    torch.manual_seed(5)
    head = RelationHead(2 * 16, hidden_features=64)
    features = torch.randn(4 * 9, 16)
    left, right, _ = relation_pair_indices(4, 9)
    plain = plain_scores(copy.deepcopy(head), features, 4, "cat")
    seen = []
    head[1].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = head.score_pairs(features, left, right, "cat")
    # The bias joins a per-view projection, so no fp32 term promotes the per-pair tail back to fp32.
    assert seen == [torch.bfloat16]
    assert torch.allclose(fast.float(), plain, atol=0.1, rtol=0.05)  # bf16 keeps ~3 significant digits
    assert (fast.float() - plain).abs().mean() < 0.02
