"""Two processes under torchrun (gloo, CPU) against a single process doing the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from relreason.data.sampler import EpochBatchSampler
from relreason.seeding import seed_everything
from relreason.train import PretrainConfig, build_model, build_pretrain_data

WORLD_SIZE = 2


def run_workers(images: Path, output: Path, *extra: str, succeed: bool = True) -> subprocess.CompletedProcess:
    worker = Path(__file__).parent / "ddp_worker.py"
    # torchrun leaves a torchelastic_* folder in the temporary directory: keep it beside the test's output
    scratch = output.parent / f"{output.name}-torchrun-tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}",
         str(worker), str(images), str(output), *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert (result.returncode == 0) == succeed, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(42):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def ddp_run(images, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp")
    return images, output, run_workers(images, output)


def single_process_reference(images: Path) -> dict[str, torch.Tensor]:
    """Each step: every rank's batch through the model separately (pairs and BatchNorm per rank), the mean loss."""
    config = PretrainConfig(dataset="folder", data_root=str(images), image_size=16, num_views=3, batch_size=8,
                            epochs=2, seed=5, device="cpu")
    seed_everything(config.seed, torch.device("cpu"))
    dataset, geometry = build_pretrain_data(config)
    model = build_model(config, geometry["image_size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    for epoch in range(config.epochs):
        dataset.set_epoch(epoch)
        shards = [list(EpochBatchSampler(len(dataset), config.batch_size, config.seed, epoch, rank, WORLD_SIZE))
                  for rank in range(WORLD_SIZE)]
        for step_batches in zip(*shards):
            losses = [model(default_collate([dataset[i] for i in batch])[0]).loss for batch in step_batches]
            optimizer.zero_grad()
            (sum(losses) / WORLD_SIZE).backward()
            optimizer.step()
    return {k: v for k, v in model.named_parameters()}


def test_ranks_hold_identical_parameters(ddp_run):
    _, output, _ = ddp_run
    rank0 = torch.load(output / "rank0.pt", weights_only=True)
    rank1 = torch.load(output / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_ddp_matches_single_process_on_the_same_global_batch(ddp_run):
    images, output, _ = ddp_run
    ddp = torch.load(output / "rank0.pt", weights_only=True)
    reference = single_process_reference(images)
    steps, lr = 2 * 3, 1e-3
    for name, parameter in reference.items():
        if name == "relation_head.0.bias":
            # A bias right before BatchNorm has a true gradient of 0: what it gets is rounding noise, which
            # Adam scales up to steps of about lr. Only that bound can hold for it.
            assert (ddp[name] - parameter.detach()).abs().max() <= steps * lr
            continue
        # Stated tolerance: gradients summed across ranks in another order than autograd's sum.
        assert torch.allclose(ddp[name], parameter.detach(), rtol=1e-4, atol=1e-5), name


def test_only_rank_zero_writes(ddp_run):
    _, output, result = ddp_run
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert result.stderr.count("epoch 2/2") == 1
    assert (output / "backbone.pt").is_file()
    assert records[0]["views_per_second"] > 0


def test_ranks_stop_after_the_same_step_when_one_rank_reaches_the_time_limit(images, tmp_path):
    # Rank 1's limit passes during the first step, rank 0's not for an hour. Stopping alone, rank 1 would
    # leave rank 0 in the next step's gradient all-reduce until the subprocess timeout fails the test.
    result = run_workers(images, tmp_path, "skewed-time-limit")
    assert "stopped during epoch 1 at step 1" in result.stderr
    assert [p.name for p in tmp_path.glob("checkpoint-*.pt")] == ["checkpoint-e0000-s0000001.pt"]
    assert json.loads((tmp_path / "backbone.json").read_text())["stopped_by"] == "time limit"
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)


def test_pretrain_ends_the_process_group_it_made_and_keeps_a_callers(ddp_run, images, tmp_path):
    _, output, _ = ddp_run
    assert [(output / f"rank{r}-process-group.txt").read_text() for r in range(WORLD_SIZE)] == ["False"] * WORLD_SIZE
    run_workers(images, tmp_path, "own-process-group")
    assert [(tmp_path / f"rank{r}-process-group.txt").read_text() for r in range(WORLD_SIZE)] == ["2"] * WORLD_SIZE


def test_a_run_stopped_on_one_rank_resumes_to_the_same_weights_and_epoch_metrics(ddp_run, tmp_path):
    """SIGTERM on rank 1 alone in step 2 of 3: both ranks checkpoint there; the rerun ends where the run
    that was never stopped ended, with the same epoch records (each rank's running sums were kept)."""
    images, reference, _ = ddp_run
    stopped = run_workers(images, tmp_path, "sigterm-at-step-2")
    assert "stopped during epoch 1 at step 2" in stopped.stderr
    run_workers(images, tmp_path)
    weights, expected = (torch.load(d / "rank0.pt", weights_only=True) for d in (tmp_path, reference))
    assert all(torch.equal(weights[key], expected[key]) for key in expected)
    records, expected_records = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                                 for d in (tmp_path, reference))
    assert [r["epoch"] for r in records] == [1, 2]
    for record, wanted in zip(records, expected_records):
        for key in ("loss", "relation_accuracy", "positive_accuracy", "negative_accuracy"):
            assert record[key] == pytest.approx(wanted[key], rel=1e-9), key


def test_running_means_are_logged_over_all_ranks_as_checkpoints_keep_them(images, tmp_path):
    """Each mid-epoch point of steps.jsonl is the mean over both ranks' batches (what a checkpoint keeps and a
    resumed epoch goes on from), not rank 0's own."""
    from relreason.checkpoint import load_checkpoint

    run_workers(images, tmp_path, "log-every-step")
    kept = {}
    for path in tmp_path.glob("checkpoint-*.pt"):
        position = load_checkpoint(path)["position"]
        if position["step"]:
            kept[position["epoch"], position["step"]] = position
    assert sorted(kept) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    points = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    mid_epoch = [p for p in points if not float(p["epoch"]).is_integer()]
    assert len(mid_epoch) == 4
    for point, (epoch, step) in zip(mid_epoch, sorted(kept)):
        totals = kept[epoch, step]["totals"]
        assert point["epoch"] == pytest.approx(epoch + step / 3)
        assert point["loss"] == pytest.approx(totals["loss"] / step, rel=1e-12)
        assert point["relation_accuracy"] == pytest.approx(100 * totals["relation_accuracy"] / step, rel=1e-12)


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(images, tmp_path):
    """Rank 1's loss turns NaN in step 2; the mean over the ranks logged there is NaN on both, so both stop with
    the same error there (one stopping alone would leave the other in the next all-reduce until the timeout)."""
    result = run_workers(images, tmp_path, "nan-on-rank-1", succeed=False)
    for rank in range(WORLD_SIZE):
        assert f"[rank{rank}]: relreason.errors.RelreasonError: the loss became nan in epoch 1" in result.stderr
    assert not list(tmp_path.glob("checkpoint-*.pt"))
    assert [json.loads(line)["epoch"] for line in (tmp_path / "steps.jsonl").read_text().splitlines()] == \
        [pytest.approx(1 / 3)]  # step 1's point; none from step 2 on


def test_rank_zero_alone_downloads_while_the_others_wait(tmp_path):
    """torchvision writes an archive straight to its final name: ranks fetching at once would write one file."""
    run_workers(tmp_path / "data", tmp_path / "run", "download")
    assert (tmp_path / "fetched-by.txt").read_text() == "rank0\n"
    assert (tmp_path / "run" / "backbone.pt").is_file()


def _download_phases(monkeypatch, outcome):
    """load_downloading_once on one rank with the collectives faked: each phase's all-gather hands back ``outcome``
    (the errors every rank reported in that phase). Returns this rank's calls of load_dataset and its reports."""
    import relreason.train.data as data

    loads, reports = [], []
    monkeypatch.setattr(data.dist, "new_group", lambda **kwargs: "patient group")
    monkeypatch.setattr(data.dist, "destroy_process_group", lambda group: reports.append("group ended"))

    def all_gather_object(errors, error, group):
        assert group == "patient group"
        reports.append(error)
        errors[:] = outcome[len([r for r in reports if r != "group ended"]) - 1]

    def load(name, root, split, download):
        loads.append(download)
        if download and outcome_of_fetch[0]:
            raise data.RelreasonError(outcome_of_fetch[0])
        return f"dataset read by a rank (download={download})"

    outcome_of_fetch = [None]
    monkeypatch.setattr(data.dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(data, "load_dataset", load)
    return loads, reports, outcome_of_fetch


def test_a_download_is_made_by_rank_zero_then_by_each_other_machines_first_process(monkeypatch, tmp_path):
    import relreason.train.data as data
    from relreason.distributed import DistributedContext

    config = PretrainConfig(dataset="mnist", data_root=str(tmp_path), download=True)
    fine = [[None] * 4, [None] * 4]
    # 2 machines x 2 processes: rank 0 fetches in phase 1, rank 2 (local rank 0 of machine 2) in phase 2.
    expected = {0: ([True], "download=True"), 1: ([False], "download=False"), 2: ([True], "download=True"),
                3: ([False], "download=False")}
    for rank, (fetched, read) in expected.items():
        loads, reports, _ = _download_phases(monkeypatch, fine)
        context = DistributedContext(rank=rank, world_size=4, local_rank=rank % 2)
        assert data.load_downloading_once(config, "train", context).endswith(f"({read})")
        assert loads == fetched and reports == [None, None, "group ended"]
        monkeypatch.undo()


def test_a_download_failing_on_rank_zero_stops_every_rank_with_its_message(monkeypatch, tmp_path):
    import relreason.train.data as data
    from relreason.distributed import DistributedContext
    from relreason.errors import RelreasonError

    failure = "could not download dataset 'mnist' into x (no network); check the network connection"
    config = PretrainConfig(dataset="mnist", data_root=str(tmp_path), download=True)
    for rank in range(WORLD_SIZE):
        loads, reports, fetch = _download_phases(monkeypatch, [[failure, None]])
        fetch[0] = failure
        with pytest.raises(RelreasonError, match="could not download dataset 'mnist'"):
            data.load_downloading_once(config, "train", DistributedContext(rank=rank, world_size=WORLD_SIZE))
        # Rank 0 reported its failure and rank 1 nothing of its own; neither read the files; each group was ended.
        assert reports == [failure if rank == 0 else None, "group ended"]
        assert loads == ([True] if rank == 0 else [])
        monkeypatch.undo()


def test_the_stop_vote_carries_a_signal_from_any_rank(monkeypatch):
    import math

    import relreason.train as train
    from relreason.distributed import DistributedContext

    vote = train.StopRequest
    stop, context = train.StopRequest(), DistributedContext(rank=1, world_size=2)
    votes = []

    def other_rank_votes(decided):
        def max_over_ranks(value, context):
            votes.append(value)
            return max(value, decided)

        monkeypatch.setattr(train.stop, "max_over_ranks", max_over_ranks)

    other_rank_votes(vote.GO_ON)
    assert not stop.agreed(math.inf, context) and not stop.signalled  # nobody asks to stop
    other_rank_votes(vote.TIME_LIMIT)
    assert stop.agreed(math.inf, context) and not stop.signalled  # another rank's time limit: stop, no signal
    other_rank_votes(vote.SIGTERM)
    assert stop.agreed(math.inf, context) and stop.signalled and stop.signal_name == "SIGTERM"  # counts here
    assert not stop.requested  # this rank received none
    other_rank_votes(vote.CTRL_C)  # every rank names the same signal, whichever rank it reached
    assert stop.agreed(math.inf, context) and stop.signal_name == "Ctrl-C"
    stop.requested = True
    other_rank_votes(vote.GO_ON)
    assert stop.agreed(math.inf, context) and stop.signalled and stop.signal_name == "SIGTERM"
    stop.interrupted = True
    assert stop.agreed(math.inf, context) and stop.signal_name == "Ctrl-C"
    fresh = train.StopRequest()
    assert fresh.agreed(-math.inf, context) and not fresh.signalled  # its own passed deadline
    assert votes == [vote.GO_ON] * 4 + [vote.SIGTERM, vote.CTRL_C, vote.TIME_LIMIT]  # what this rank put to the vote


def test_a_single_process_on_another_gpu_makes_it_the_current_device(monkeypatch):
    # Pinned memory opens a CUDA context on the current device: GPU 0 unless --device cuda:N is made current.
    from relreason.distributed import init_distributed

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    for device in (torch.device("cuda", 1), torch.device("cuda"), torch.device("cpu")):
        context, chosen = init_distributed(device)
        assert chosen == device and not context.enabled
    assert made_current == [torch.device("cuda", 1)]  # an unnumbered cuda is already the current one


def test_a_run_folder_in_use_is_refused_alike_on_every_rank(images, tmp_path):
    """Rank 0 takes the folder's lock and hands its refusal to the others: each rank stops with the one-line
    error, none is left waiting for rank 0 in a collective."""
    from folder_lock import held_by_another_process

    run = tmp_path / "run"
    run.mkdir()
    with held_by_another_process(run):
        result = run_workers(images, run, succeed=False)
    for rank in range(WORLD_SIZE):
        assert f"[rank{rank}]: relreason.errors.RelreasonError: run folder {run} is in use by another relreason " \
               "process" in result.stderr
    assert "Connection closed" not in result.stderr and list(run.iterdir()) == []
