"""Learning-rate schedules: the factor per step, and what the trainer's optimizer actually used."""

import json
import math

import pytest
import torch

from relreason.data.sampler import EpochBatchSampler
from relreason.schedule import learning_rate_factor, set_learning_rate
from relreason.train import PretrainConfig, pretrain


def test_constant_schedule_with_linear_warmup():
    factors = [learning_rate_factor(step, 100, 4, "constant") for step in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4:] == [1.0] * 6
    assert learning_rate_factor(0, 100, 0, "constant") == 1.0


def test_cosine_schedule_falls_from_one_towards_zero():
    total, warmup = 50, 10
    factors = [learning_rate_factor(step, total, warmup, "cosine") for step in range(total)]
    assert factors[warmup - 1] == 1.0 and factors[warmup] == 1.0
    assert all(a > b for a, b in zip(factors[warmup:], factors[warmup + 1:]))  # strictly decreasing
    assert factors[warmup + (total - warmup) // 2] == pytest.approx(0.5)
    assert 0 < factors[-1] < 0.01
    assert learning_rate_factor(total + 5, total, warmup, "cosine") == 0.0  # past the end: stays at 0


def test_set_learning_rate_scales_each_group_by_its_own_base():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [a], "base_lr": 1e-3}, {"params": [b], "base_lr": 1e-2}])
    set_learning_rate(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-3]


def cosine_digits_run(tmp_path, epochs: int, warmup_epochs: float):
    """A cosine-schedule pretrain on digits at lr 2e-3: 6 steps per epoch of 256 images."""
    return pretrain(PretrainConfig(dataset="digits", image_size=16, num_views=2, batch_size=256, epochs=epochs,
                                   seed=0, lr=2e-3, lr_schedule="cosine", warmup_epochs=warmup_epochs, device="cpu",
                                   progress=False, tensorboard=False, output_dir=str(tmp_path / "run")))


def test_trainer_follows_the_cosine_schedule(tmp_path):
    result = cosine_digits_run(tmp_path, epochs=4, warmup_epochs=1)
    steps = EpochBatchSampler(1438, 256, 0, 0).steps_per_epoch  # the 1,438 training digits: 6 batches
    rates = [record["lr"] for record in result.history]  # the rate of each epoch's last step
    expected = [2e-3 * learning_rate_factor((epoch + 1) * steps - 1, 4 * steps, steps, "cosine") for epoch in range(4)]
    assert rates == pytest.approx(expected)
    assert rates[0] == pytest.approx(2e-3) and rates[1] < rates[0] and rates[-1] < 0.1 * 2e-3
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr_schedule"] == "cosine" and saved["warmup_epochs"] == 1
    assert not math.isnan(result.history[-1]["loss"])


def test_unknown_schedule_is_refused_not_read_as_cosine():
    from relreason import RelreasonError

    with pytest.raises(RelreasonError, match="unknown learning-rate schedule 'linear'"):
        learning_rate_factor(5, 10, 0, "linear")


def test_set_learning_rate_takes_a_plain_optimizers_rate_as_its_base():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    set_learning_rate(optimizer, 0.5)
    set_learning_rate(optimizer, 0.1)  # a factor of the first rate, not of the one set before
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_a_fractional_warm_up_lasts_the_nearest_whole_number_of_steps(tmp_path):
    """0.6 of a 6-step epoch is 3.6 steps: the warm-up lasts 4 (3 would be the truncation)."""
    result = cosine_digits_run(tmp_path, epochs=2, warmup_epochs=0.6)
    steps = EpochBatchSampler(1438, 256, 0, 0).steps_per_epoch
    assert steps == 6
    last_step_of_first_epoch = steps - 1  # the warm-up is over by then: one step into the cosine
    expected = 2e-3 * 0.5 * (1 + math.cos(math.pi * (last_step_of_first_epoch - 4) / (2 * steps - 4)))
    assert result.history[0]["lr"] == pytest.approx(expected)
