import pytest
import torch
import torch.nn.functional as F
from loop_reference import formula_focal, plain_focal

from relreason import FocalLoss, RelreasonError, build_loss


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.5), (0.0, 0.5), (1.5, 0.25)])
def test_focal_equals_plain_formula(gamma, alpha):
    torch.manual_seed(0)
    logits = torch.randn(50, dtype=torch.float64) * 3
    targets = (torch.rand(50) > 0.5).double()
    got = FocalLoss(gamma, alpha)(logits, targets)
    assert torch.allclose(got, torch.as_tensor(plain_focal(logits, targets, gamma, alpha)), atol=1e-10)


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.5), (1.5, 0.25), (0.5, 0.7)])
def test_focal_gradient_equals_the_plain_formulas(gamma, alpha):
    """The gradient flows through the modulating factor (1 - p_t)^gamma too, as in the formula."""
    torch.manual_seed(1)
    logits = (torch.randn(40, dtype=torch.float64) * 3).requires_grad_()
    targets = (torch.rand(40) > 0.5).double()
    (got,) = torch.autograd.grad(FocalLoss(gamma, alpha)(logits, targets), logits)
    plain_logits = logits.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(formula_focal(gamma, alpha)(plain_logits, targets), plain_logits)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.001, 0.5, 0.999, 2.0])
def test_focal_gradient_stays_finite_on_saturated_logits(gamma):
    # fp32 sigmoid rounds to exactly 1 here; (1 - p) ** gamma has an infinite slope at 0 when gamma < 1.
    logits = torch.tensor([17.0, 17.5, 30.0, -30.0, 1.0, 30.0], requires_grad=True)
    targets = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    loss = FocalLoss(gamma, 0.25)(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[:4].abs().max() < 1e-6  # confident and right: almost no gradient
    assert logits.grad[5] > 0  # confident and wrong: pushed back
    exact = plain_focal(logits.detach().double(), targets.double(), gamma, 0.25)
    assert torch.allclose(loss.double(), torch.as_tensor(exact, dtype=torch.float64), rtol=1e-4)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_second_derivatives_are_finite_and_right(gamma):
    """A gradient penalty differentiates the loss twice: on 0/1 targets, soft ones and a mix."""
    torch.manual_seed(2)
    logits = (torch.randn(12, dtype=torch.float64) * 2).requires_grad_()
    for targets in [(torch.rand(12) > 0.5).double(), torch.rand(12, dtype=torch.float64),
                    torch.tensor([0.0, 1.0, 0.3] * 4, dtype=torch.float64)]:
        loss = FocalLoss(gamma, 0.25)
        assert torch.autograd.gradgradcheck(lambda z, t=targets, focal=loss: focal(z, t), (logits,))
    hard = (torch.rand(12) > 0.5).double()
    (grad,) = torch.autograd.grad(FocalLoss(gamma, 0.25)(logits, hard), logits, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), logits)
    plain_logits = logits.detach().clone().requires_grad_()
    (plain_grad,) = torch.autograd.grad(formula_focal(gamma, 0.25)(plain_logits, hard), plain_logits, create_graph=True)
    (plain_second,) = torch.autograd.grad(plain_grad.square().sum(), plain_logits)
    assert torch.isfinite(second).all() and torch.allclose(second, plain_second, rtol=1e-9, atol=1e-12)


def test_focal_with_soft_targets_blends_both_terms():
    logits = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    soft = torch.tensor([0.7, 0.2, 0.5], dtype=torch.float64)
    p = torch.sigmoid(logits)
    p_true = soft * p + (1 - soft) * (1 - p)
    expected = ((1 - p_true) ** 2 * F.binary_cross_entropy_with_logits(logits, soft, reduction="none")).mean()
    assert torch.allclose(FocalLoss(2.0, None)(logits, soft), expected, atol=1e-12)


def test_focal_gamma_zero_is_half_bce_and_downweights_easy_pairs():
    logits = torch.tensor([4.0, -4.0, 0.1, -0.2])
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0])
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(FocalLoss(gamma=0.0, alpha=0.5)(logits, targets), bce / 2)
    assert FocalLoss(gamma=2.0)(logits, targets) < bce / 2


def test_build_loss_names_and_errors():
    assert isinstance(build_loss("bce"), torch.nn.BCEWithLogitsLoss)
    focal = build_loss("focal", gamma=3.0, alpha=0.3)
    assert focal.gamma == 3.0 and focal.alpha == 0.3
    with pytest.raises(RelreasonError, match="unknown loss"):
        build_loss("hinge")
    with pytest.raises(RelreasonError, match="alpha"):
        FocalLoss(alpha=1.5)
