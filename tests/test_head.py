"""The factorised relation head against the plain one: pair vectors formed, then the whole head applied."""

import copy

import pytest
import torch
from loop_reference import loop_aggregate

from relreason import RelationHead, RelreasonError, pair_tail
from relreason.pairing import aggregation_width, relation_pair_indices


def plain_scores(head, features, num_views, aggregation):
    pairs, _ = loop_aggregate(features, num_views, aggregation)
    return head(pairs).squeeze(1)


@pytest.mark.parametrize("aggregation,stream_tail", [(a, False) for a in ("cat", "sum", "mean", "max")] +
                         [(a, True) for a in ("cat", "sum", "mean")])  # max forms its pairs: nothing to stream
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_views,batch_size", [(2, 2), (4, 7), (16, 5)])
def test_score_pairs_equals_plain_head(aggregation, dtype, num_views, batch_size, stream_tail, monkeypatch):
    # Chunks of 7 pairs: several per batch, the last one partial.
    monkeypatch.setattr(pair_tail, "_CHUNK_ELEMENTS", 7 * 32)
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
    fast = fast_head.score_pairs(fast_features, left, right, aggregation, stream_tail=stream_tail)
    plain = plain_scores(plain_head, plain_features, num_views, aggregation)
    (fast * weights).sum().backward()
    (plain * weights).sum().backward()

    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    assert fast.shape == plain.shape == (num_views * (num_views - 1) * batch_size,)
    assert torch.allclose(fast, plain, **tol)
    assert torch.allclose(fast_features.grad, plain_features.grad, **tol)
    for (name, a), b in zip(fast_head.named_parameters(), plain_head.parameters(), strict=True):
        if name == "0.bias" and aggregation != "max":
            # Exactly zero in exact arithmetic (BatchNorm removes any shift); both hold only rounding noise.
            assert a.grad.abs().max() < 10 * tol["atol"] and b.grad.abs().max() < 10 * tol["atol"]
        else:
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


@pytest.mark.parametrize("aggregation", ["sum", "mean", "max"])
def test_score_pairs_refuses_mismatched_width_of_one_wide_aggregations(aggregation):
    head = RelationHead(10)
    left, right, _ = relation_pair_indices(2, 3)
    with pytest.raises(RelreasonError, match=f"'{aggregation}' of 4-wide features gives 4.*in_features=4"):
        head.score_pairs(torch.randn(6, 4), left, right, aggregation)


def test_score_pairs_refuses_features_that_are_not_one_row_per_image():
    head = RelationHead(32)
    left, right, _ = relation_pair_indices(2, 4)
    with pytest.raises(RelreasonError, match=r"\(N, d\) features, got features shaped \(16,\)"):
        head.score_pairs(torch.randn(16), left, right)


def test_score_pairs_refuses_indices_and_heads_it_cannot_use_in_one_line():
    head = RelationHead(8)
    features = torch.randn(6, 4)
    left, right, _ = relation_pair_indices(2, 3)
    with pytest.raises(RelreasonError, match=r"left must be a tensor of integer row indices, got list"):
        head.score_pairs(features, left.tolist(), right)
    with pytest.raises(RelreasonError, match=r"right must be a tensor of integer row indices, got torch.float32"):
        head.score_pairs(features, left, right.float())
    meta_left, meta_right, _ = relation_pair_indices(2, 3, device="meta")  # another device than the features'
    with pytest.raises(RelreasonError, match=r"left indices are on meta and the features on cpu; pass "
                       r"relation_pair_indices\(K, B, device=features.device\)"):
        head.score_pairs(features, meta_left, meta_right)
    with pytest.raises(RelreasonError, match=r"the relation head is on cpu and the features on meta; move the head"):
        head.score_pairs(features.to("meta"), meta_left, meta_right)
    assert head.score_pairs(features, left.int(), right.int()).shape == (6,)  # int32 indices serve as well


@pytest.mark.parametrize("in_features, hidden", [(0, 256), (8, 0), (-2, 256), (8, 2.5)])
def test_head_sizes_must_be_positive_integers(in_features, hidden):
    with pytest.raises(RelreasonError, match="must be a positive integer"):
        RelationHead(in_features, hidden)


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


def streamed_and_plain(head, features, num_views, **kwargs):
    """Scores and gradients of the streamed tail and of the plain head on copies of ``head``."""
    results = []
    for stream_tail in (True, False):
        copy_ = copy.deepcopy(head)
        inputs = features.clone().requires_grad_()
        left, right, _ = relation_pair_indices(num_views, features.shape[0] // num_views)
        scores = copy_.score_pairs(inputs, left, right, "cat", stream_tail=stream_tail, **kwargs)
        (scores * torch.linspace(-1, 1, scores.numel(), dtype=scores.dtype)).sum().backward()
        results.append((copy_, scores, inputs.grad))
    return results


def test_streamed_tail_with_zero_batchnorm_scale_and_cumulative_momentum(monkeypatch):
    """A zero-initialised BatchNorm scale (no division by it) and ``momentum=None`` (a cumulative average)."""
    monkeypatch.setattr(pair_tail, "_CHUNK_ELEMENTS", 5 * 16)
    torch.manual_seed(1)
    head = RelationHead(2 * 6, hidden_features=16).double()
    head[1].momentum = None
    with torch.no_grad():
        head[1].weight[:8] = 0.0
    features = torch.randn(3 * 6, 6, dtype=torch.float64)
    (streamed, fast, fast_grad), (plain_head, plain, plain_grad) = streamed_and_plain(head, features, 3)
    assert torch.allclose(fast, plain, rtol=1e-10, atol=1e-12)
    assert torch.allclose(fast_grad, plain_grad, rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(streamed.named_parameters(), plain_head.parameters(), strict=True):
        assert torch.isfinite(a.grad).all() and torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), name
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(streamed[1], name), getattr(plain_head[1], name), rtol=1e-12), name


def test_streamed_tail_variance_survives_a_large_shared_offset_in_fp32():
    """Pair sums far from zero but close together: E[z^2] - E[z]^2 would cancel to noise in fp32."""
    torch.manual_seed(2)
    head = RelationHead(2 * 8, hidden_features=16)
    with torch.no_grad():
        head[0].bias.fill_(1000.0)
    features = torch.randn(4 * 8, 8)
    _, (exact_head, exact, exact_grad) = streamed_and_plain(copy.deepcopy(head).double(), features.double(), 4)
    for tail, scores, grad in streamed_and_plain(head, features, 4):  # streamed, then plain: as close as it
        assert torch.allclose(tail[1].running_var.double(), exact_head[1].running_var, rtol=1e-5)
        # The projections themselves are rounded to fp32's ~6e-5 steps at 1000, for both tails.
        assert torch.allclose(scores.double(), exact, atol=5e-4)
        assert torch.allclose(grad.double(), exact_grad, atol=1e-4)


def test_stream_tail_default_follows_the_pair_buffer_size(monkeypatch):
    calls = spy_on_streaming(monkeypatch)
    head = RelationHead(2 * 4, hidden_features=8)
    left, right, _ = relation_pair_indices(4, 5)  # 60 pairs x 8 hidden fp32 = 1,920 bytes
    features = torch.randn(20, 4)
    monkeypatch.setattr("relreason.head.STREAM_ABOVE_BYTES", 1920)
    head.score_pairs(features, left, right)
    assert calls == []
    monkeypatch.setattr("relreason.head.STREAM_ABOVE_BYTES", 1919)
    head.score_pairs(features, left, right)
    assert calls == [1]
    head.score_pairs(features, left, right, stream_tail=False)  # forced off
    with torch.autocast("cpu", dtype=torch.bfloat16):  # low precision keeps the plain tail
        head.score_pairs(features, left, right)
    head.eval()
    head.score_pairs(features, left, right, stream_tail=True)  # eval mode: running statistics, plain tail
    assert calls == [1]


def test_streamed_tail_is_deterministic():
    torch.manual_seed(4)
    head = RelationHead(2 * 16, hidden_features=64)
    features = torch.randn(8 * 16, 16)
    first, second = streamed_and_plain(head, features, 8)[0], streamed_and_plain(head, features, 8)[0]
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    for a, b in zip(first[0].parameters(), second[0].parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def second_derivatives(head: RelationHead, features: torch.Tensor, stream: bool, aggregation: str = "cat"):
    """Gradients of a gradient penalty ``|d loss / d features|^2`` with respect to the features and every head
    parameter, through the streamed or the plain tail."""
    head = copy.deepcopy(head)
    features = features.clone().requires_grad_(True)
    left, right, _ = relation_pair_indices(3, features.shape[0] // 3)
    scores = head.score_pairs(features, left, right, aggregation, stream_tail=stream)
    assert ("StreamedPairTail" in type(scores.grad_fn).__name__) == stream
    (grad,) = torch.autograd.grad(scores.square().sum(), features, create_graph=True)
    inputs = [features, *head.parameters()]
    return torch.autograd.grad(grad.square().sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("aggregation", ["cat", "sum"])
def test_streamed_tail_second_derivatives_equal_plain(dtype, tolerance, aggregation):
    torch.manual_seed(0)
    head = RelationHead(aggregation_width(4, aggregation), hidden_features=8).to(dtype)
    features = torch.randn(15, 4, dtype=dtype)
    streamed = second_derivatives(head, features, stream=True, aggregation=aggregation)
    plain = second_derivatives(head, features, stream=False, aggregation=aggregation)
    for a, b in zip(streamed, plain):
        if b is None:  # the last Linear's bias has no second-order effect on the features' gradient
            assert a is None or torch.count_nonzero(a) == 0
            continue
        assert a is not None and torch.allclose(a, b, rtol=tolerance, atol=tolerance), (a - b).abs().max()


def test_streamed_tail_passes_gradgradcheck():
    torch.manual_seed(1)
    left, right, _ = relation_pair_indices(3, 4)
    batch_norm, last = torch.nn.BatchNorm1d(5).double(), torch.nn.Linear(5, 1).double()
    parts = [torch.randn(12, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradgradcheck(
        lambda u, v: pair_tail.streamed_pair_tail(u, v, left, right, batch_norm, 0.01, last), parts
    )


def spy_on_streaming(monkeypatch):
    calls = []
    real = pair_tail.streamed_pair_tail
    monkeypatch.setattr("relreason.head.streamed_pair_tail", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def frozen_batchnorm(head):
    head.train()
    head[1].eval()  # a common way to freeze BatchNorm's statistics while the rest trains
    return head


def no_running_statistics(head):
    head[1] = torch.nn.BatchNorm1d(head.hidden_features, track_running_stats=False)
    return head


def relu_activation(head):
    head[2] = torch.nn.ReLU()
    return head


def last_without_bias(head):
    head[3] = torch.nn.Linear(head.hidden_features, 1, bias=False)
    return head


def batchnorm_without_affine(head):
    head[1] = torch.nn.BatchNorm1d(head.hidden_features, affine=False)
    return head


def hooked_batchnorm(head):
    head[1].register_forward_hook(lambda module, inputs, output: output * 2)
    return head


@pytest.mark.parametrize("change,streams", [
    (frozen_batchnorm, False), (no_running_statistics, True), (relu_activation, False),
    (last_without_bias, False), (hooked_batchnorm, False), (batchnorm_without_affine, False),
])
def test_stream_tail_only_where_it_computes_what_the_modules_would(change, streams, monkeypatch):
    """A forced stream_tail=True streams only the stock tail; otherwise the modules themselves run."""
    torch.manual_seed(6)
    head = RelationHead(2 * 4, hidden_features=8)
    head(torch.randn(30, 8))  # running statistics away from their initial values
    head = change(head)
    calls = spy_on_streaming(monkeypatch)
    features = torch.randn(5 * 4, 4)
    left, right, _ = relation_pair_indices(5, 4)
    expected_head = copy.deepcopy(head)
    scores = head.score_pairs(features, left, right, stream_tail=True)
    expected = expected_head(torch.cat([features[left], features[right]], 1)).squeeze(1)
    assert calls == ([1] if streams else [])
    assert torch.allclose(scores, expected, atol=1e-5)
    for a, b in zip(head.buffers(), expected_head.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_streamed_tail_follows_the_heads_own_slope_eps_and_momentum(monkeypatch):
    """Non-default LeakyReLU slope and BatchNorm eps and momentum reach the streamed tail."""
    monkeypatch.setattr(pair_tail, "_CHUNK_ELEMENTS", 7 * 8)
    torch.manual_seed(8)
    head = RelationHead(2 * 4, hidden_features=8, negative_slope=0.2)
    head[1].eps, head[1].momentum = 0.5, 0.3  # a large eps: the variance of these features is ~1
    plain_head = copy.deepcopy(head)
    features = torch.randn(5 * 4, 4, dtype=torch.float64)
    head, plain_head = head.double(), plain_head.double()
    left, right, _ = relation_pair_indices(5, 4)
    calls = spy_on_streaming(monkeypatch)
    streamed = head.score_pairs(features, left, right, stream_tail=True)
    assert calls == [1]
    plain = plain_scores(plain_head, features, 5, "cat")
    assert torch.allclose(streamed, plain, atol=1e-10)
    for a, b in zip(head.buffers(), plain_head.buffers(), strict=True):
        assert torch.allclose(a.double(), b.double(), atol=1e-12)


def test_one_pair_is_refused_as_batchnorm_refuses_it():
    head = RelationHead(2 * 4, hidden_features=8)
    one = torch.tensor([0])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        head.score_pairs(torch.randn(2, 4), one, one + 1, stream_tail=True)


def scaled_first_layer(head):
    head[0].register_forward_hook(lambda module, inputs, output: output * 3)
    return head


def shifted_head_input(head):
    head.register_forward_pre_hook(lambda module, inputs: (inputs[0] + 1,))
    return head


class TwiceHead(RelationHead):
    def forward(self, pairs):
        return super().forward(pairs) * 2


def subclass_with_forward(head):
    twice = TwiceHead(head.in_features, head.hidden_features)
    twice.load_state_dict(head.state_dict())
    return twice


@pytest.mark.parametrize("aggregation", ["cat", "sum"])
@pytest.mark.parametrize("change", [scaled_first_layer, shifted_head_input, subclass_with_forward])
def test_factorised_path_gives_way_to_hooks_and_overrides(change, aggregation):
    """What the factorised path would skip (hooks on the head or its first Linear, a forward of its own)
    makes score_pairs run the modules on formed pairs."""
    torch.manual_seed(7)
    head = change(RelationHead(aggregation_width(4, aggregation), hidden_features=8)).eval()
    features = torch.randn(3 * 5, 4)
    left, right, _ = relation_pair_indices(3, 5)
    pairs = torch.cat([features[left], features[right]], 1) if aggregation == "cat" else features[left] + features[right]
    assert torch.allclose(head.score_pairs(features, left, right, aggregation), head(pairs).squeeze(1), atol=1e-5)


def test_a_lazy_first_layer_is_left_to_learn_its_width():
    head = RelationHead(8)
    head[0] = torch.nn.LazyLinear(256)  # a user's replacement: its width is not known before its first call
    left, right, _ = relation_pair_indices(2, 4)
    scores = head.score_pairs(torch.randn(8, 5), left, right, "cat")
    assert scores.shape == (8,) and head[0].in_features == 10
