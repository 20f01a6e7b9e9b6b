"""What a library call leaves in the caller's process (a notebook, one's own script): the global random streams and
matplotlib's backend are as the caller left them."""

import random

import matplotlib
import numpy as np
import torch

from relreason.evaluate import EvaluateConfig, run_evaluation
from relreason.train import PretrainConfig, pretrain


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def seed_callers_streams():
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)


def test_pretrain_and_evaluate_leave_the_callers_random_streams_where_they_were(tmp_path):
    seed_callers_streams()
    expected = [draws(), draws()]
    seed_callers_streams()
    first = draws()
    result = pretrain(PretrainConfig(dataset="digits", image_size=16, num_views=2, epochs=1, device="cpu",
                                     progress=False, tensorboard=False, output_dir=str(tmp_path / "run")))
    second = draws()
    assert [first, second] == expected
    seed_callers_streams()
    first = draws()
    run_evaluation(EvaluateConfig(run_dir=str(result.run_dir), protocols=("knn",), device="cpu", progress=False))
    assert [first, draws()] == expected


def test_the_plots_leave_matplotlib_s_backend_as_the_caller_chose(tmp_path):
    from relreason.compare import plot_curves
    from relreason.protocols.retrieval import plot_retrieval
    from relreason.train.metrics_log import plot_training_curves

    chosen = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's inline backend
    try:
        history = [{"epoch": 1, "loss": 0.7, "relation_accuracy": 60.0}, {"epoch": 2, "loss": 0.6}]
        assert plot_training_curves(history, tmp_path / "curves.png")
        plot_curves([{"method": "relational", "seed": 1, "steps": [{"minutes": 0.1, "loss": 0.7}]}],
                    tmp_path / "compare.png")
        features, labels = torch.randn(30, 8), torch.arange(30) % 3
        images = [(np.zeros((8, 8, 3), dtype=np.uint8), int(label)) for label in labels]
        plot_retrieval(images, features, labels, tmp_path / "retrieval.png", num_queries=2, top=3)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(chosen)
    for name in ("curves.png", "compare.png", "retrieval.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_work_on_the_cpu_leaves_cuda_s_generators_alone(tmp_path, monkeypatch):
    """torch.manual_seed would queue a seed for CUDA's first use, which the caller's next GPU work would inherit."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(seed))
    result = pretrain(PretrainConfig(dataset="digits", image_size=16, num_views=2, epochs=1, device="cpu", seed=7,
                                     progress=False, tensorboard=False, output_dir=str(tmp_path / "run")))
    run_evaluation(EvaluateConfig(run_dir=str(result.run_dir), protocols=("knn", "finetune"), finetune_epochs=1,
                                  device="cpu", progress=False))
    assert seeded == []
