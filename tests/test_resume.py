"""Runs that die (SIGKILL, truncated checkpoints) resume where they stopped and lose nothing."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from relreason.checkpoint import list_checkpoints
from relreason.errors import RelreasonError
from relreason.train import PretrainConfig, pretrain


def command(output_dir):
    return [sys.executable, "-m", "relreason", "pretrain", "--dataset", "digits", "--image-size", "16", "-K", "3",
            "--batch-size", "32", "--epochs", "3", "--checkpoint-every", "5", "--seed", "7", "--device", "cpu",
            "--lr-schedule", "cosine", "--warmup-epochs", "0.5",  # the rate depends on the step: resumed alike
            "--no-progress", "--no-tensorboard", "--output-dir", str(output_dir)]


def assert_same_weights(run_a, run_b):
    a = torch.load(run_a / "backbone.pt", weights_only=True)
    b = torch.load(run_b / "backbone.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_a_random_step_then_rerun_is_bit_identical(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(command(reference), check=True, capture_output=True, timeout=300)

    # A random step after the first checkpoint, before the end (training time read from the reference run).
    # On a machine whose load drops meanwhile the run can outpace the reference and finish first: then
    # again, with a shorter window.
    train_seconds = sum(json.loads(line)["seconds"] for line in (reference / "metrics.jsonl").read_text().splitlines())
    # Each run kills at other moments; RELREASON_TEST_SEED=<the seed a failure names> replays its delays.
    seed = int(os.environ.get("RELREASON_TEST_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    for window in (0.6, 0.3, 0.15):
        killed = tmp_path / f"killed-{window}"
        process = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list_checkpoints(killed) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        delay = rng.uniform(0.0, window * train_seconds)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if process.returncode == -signal.SIGKILL and not (killed / "backbone.pt").exists():
            break
    else:
        raise AssertionError(f"the run finished before it could be killed, three times (RELREASON_TEST_SEED={seed})")
    stopped_at = list_checkpoints(killed)[0].name
    replay = f"killed {delay:.2f} s after its first checkpoint, newest {stopped_at}; RELREASON_TEST_SEED={seed}"

    rerun = subprocess.run(command(killed), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, f"{replay}\n{rerun.stderr[-2000:]}"
    assert "resuming" in rerun.stderr, replay
    try:
        assert_same_weights(reference, killed)
        assert losses(reference) == losses(killed)
    except AssertionError as failure:
        raise AssertionError(f"{replay}: {failure}") from None


def small_config(tmp_path, name, epochs):
    return PretrainConfig(dataset="digits", image_size=16, num_views=3, batch_size=64, epochs=epochs, seed=2,
                          device="cpu", progress=False, tensorboard=False, output_dir=str(tmp_path / name))


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    pretrain(small_config(tmp_path, "straight", 3))
    run = tmp_path / "damaged"
    pretrain(small_config(tmp_path, "damaged", 2))
    newest, previous = list_checkpoints(run)
    assert (newest.name, previous.name) == ("checkpoint-e0002-s0000000.pt", "checkpoint-e0001-s0000000.pt")
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    capsys.readouterr()

    pretrain(small_config(tmp_path, "damaged", 3))
    err = capsys.readouterr().err
    assert f"passing over {newest.name}: it cannot be read (" in err and "truncated or corrupt; trying the one" in err
    assert f"resuming {previous}" in err
    assert_same_weights(tmp_path / "straight", run)
    assert losses(tmp_path / "straight") == losses(run)


def test_no_readable_checkpoint_is_refused_not_started_over(tmp_path):
    pretrain(small_config(tmp_path, "damaged", 2))
    run = tmp_path / "damaged"
    damaged = {path: b"garbage\n" for path in list_checkpoints(run)}
    for path, data in damaged.items():
        path.write_bytes(data)
    with pytest.raises(RelreasonError, match=r"none of the 2 checkpoint\(s\) in .* can be read \(the oldest, "
                       r"checkpoint-e0001-s0000000.pt, cannot be read \([A-Za-z]+Error: .*\), truncated or corrupt\); "
                       r"delete them to start this run over"):
        pretrain(small_config(tmp_path, "damaged", 3))
    assert {path: path.read_bytes() for path in list_checkpoints(run)} == damaged  # left as they were


@pytest.mark.parametrize("signum, status, name, says, extra", [
    (signal.SIGTERM, 143, "SIGTERM", "stopped by SIGTERM after 0 epoch(s)", []),
    # SIGTERM to the process group (Slurm's scancel, `timeout`): the DataLoader workers must survive it too.
    (signal.SIGTERM, 143, "SIGTERM", "stopped by SIGTERM after 0 epoch(s)", ["--augment", "pil", "--num-workers", "1"]),
    # Ctrl-C reaches the whole process group, DataLoader workers included: they must keep serving the step.
    (signal.SIGINT, 130, "Ctrl-C", "relreason: interrupted; the checkpoints written so far are kept",
     ["--augment", "pil", "--num-workers", "1"]),
])
def test_a_signal_checkpoints_mid_epoch_and_stops(tmp_path, signum, status, name, says, extra):
    run = tmp_path / "preempted"
    # A terminal's Ctrl-C: SIGINT at its default, also when the tests run where it is ignored (a background job).
    process = subprocess.Popen(command(run) + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list_checkpoints(run) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == status, err[-2000:]
    assert "stopped during epoch" in err and says in out + err
    assert "Traceback" not in err
    assert (run / "backbone.pt").is_file()
    meta = json.loads((run / "backbone.json").read_text())
    assert meta["stopped_by"] == name and not meta["finished"]
    newest = list_checkpoints(run)[0].name
    assert not newest.endswith("s0000000.pt") and not newest.endswith("s0000005.pt")  # the step it stopped at


def test_a_second_ctrl_c_quits_at_once():
    from relreason.train import StopRequest

    original = signal.getsignal(signal.SIGINT)
    request = StopRequest.install()
    try:
        assert signal.getsignal(signal.SIGINT) == request._handle
        request._handle(signal.SIGINT, None)
        assert request.requested and request.interrupted
        with pytest.raises(KeyboardInterrupt):
            request._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) == original  # given back on the way out
    finally:
        request.uninstall()
        signal.signal(signal.SIGINT, original)


def test_random_state_round_trip_keeps_to_the_training_device(monkeypatch):
    from relreason.checkpoint import rng_state, set_rng_state

    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state  # a CPU run never touches (or initialises) a GPU
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state, torch.device("cpu"))
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])

    # On a GPU only that GPU's generator is restored; older checkpoints hold a list with one per GPU.
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, device: restored.append((value, device)))
    gpu = torch.device("cuda", 1)
    per_gpu = [torch.full((4,), i, dtype=torch.uint8) for i in range(3)]
    set_rng_state(state | {"cuda": per_gpu}, gpu)
    set_rng_state(state | {"cuda": per_gpu[2]}, gpu)
    set_rng_state(state | {"cuda": per_gpu[:1]}, gpu)  # saved on a machine with fewer GPUs: left as seeded
    set_rng_state(state | {"cuda": per_gpu}, torch.device("cpu"))
    assert [(int(v[0]), d) for v, d in restored] == [(1, gpu), (2, gpu)]


def test_pruning_counts_from_the_checkpoint_just_written_and_drops_those_known_to_be_behind(tmp_path):
    """A later-named file that could not be read at the resume (perhaps only for a moment) is kept and not
    counted; one known to hold less progress (a resume under more processes numbers its steps anew) goes."""
    from relreason.checkpoint import checkpoint_path, rotate_checkpoints

    behind = checkpoint_path(tmp_path, 0, 40)  # e.g. resumed from here under twice the processes
    behind.write_bytes(b"x")
    unreadable = checkpoint_path(tmp_path, 9, 0)
    unreadable.write_bytes(b"could not be read when the run resumed")
    older = [checkpoint_path(tmp_path, 0, step) for step in (10, 20)]
    for path in older:
        path.write_bytes(b"x")
    just_written = checkpoint_path(tmp_path, 0, 30)
    just_written.write_bytes(b"x")
    rotate_checkpoints(tmp_path, 2, newest=just_written, behind=[behind])
    assert list_checkpoints(tmp_path) == [unreadable, just_written, older[1]]


def test_the_umask_is_read_without_being_changed():
    import os

    from relreason.atomic_files import _read_umask

    previous = os.umask(0o027)
    try:
        assert _read_umask() == 0o027 and _read_umask() == 0o027
    finally:
        os.umask(previous)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask_in_force_when_they_write(tmp_path, umask, mode):
    """Set after relreason was imported (a notebook tightening it later), as a file open() makes would get."""
    from relreason import atomic_files

    previous = os.umask(umask)
    try:
        atomic_files.atomic_write_json(tmp_path / "config.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(previous)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == mode


def test_without_proc_atomic_writes_take_the_umask_of_the_import(tmp_path, monkeypatch):
    from relreason import atomic_files

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(atomic_files, "open", no_proc, raising=False)  # the module's open(), not the builtin
    monkeypatch.setattr(atomic_files, "_UMASK_AT_IMPORT", 0o077)
    atomic_files.atomic_write_json(tmp_path / "config.json", {"a": 1})
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o600


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """A crash (here a failing fsync) between writing and renaming keeps the previous file and no temporary."""
    import os

    from relreason import atomic_files

    target = tmp_path / "checkpoint-e0001-s0000000.pt"
    target.write_bytes(b"old checkpoint")
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(atomic_files.os, "replace", lambda a, b: renames.append((a, b)) or real_replace(a, b))

    def failing_fsync(descriptor):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_files.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_files.atomic_write_bytes(target, b"new checkpoint, half written")
    assert target.read_bytes() == b"old checkpoint" and sorted(tmp_path.iterdir()) == [target]
    assert renames == []
    monkeypatch.setattr(atomic_files.os, "fsync", lambda descriptor: None)
    atomic_files.atomic_write_bytes(target, b"new checkpoint")
    assert target.read_bytes() == b"new checkpoint" and sorted(tmp_path.iterdir()) == [target]
    assert len(renames) == 1 and renames[0][1] == target and renames[0][0] != str(target)


def test_checkpoints_written_by_other_package_versions_are_not_called_corrupt(tmp_path, monkeypatch):
    import relreason.checkpoint as checkpoint_module

    pretrain(small_config(tmp_path, "moved", 1))
    run = tmp_path / "moved"

    def load_needing_a_missing_module(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'numpy._core'", name="numpy._core")

    monkeypatch.setattr(checkpoint_module.torch, "load", load_needing_a_missing_module)
    with pytest.raises(RelreasonError) as refused:
        checkpoint_module.load_newest_checkpoint(run)
    message = str(refused.value)
    assert "cannot be read here (ModuleNotFoundError: No module named 'numpy._core'), written by other package" in message
    assert "install the package versions they were written with to resume, or choose another" in message
    assert "delete" not in message and "corrupt" not in message


def test_short_reason_drops_terminal_codes_and_cuts_at_a_word():
    from relreason.errors import short_reason

    error = RuntimeError("\x1b[1mWeights only load failed.\x1b[0m " + "word " * 40)
    said = short_reason(error)
    assert said.startswith("RuntimeError: Weights only load failed. word") and "\x1b" not in said
    assert said.endswith(" ...") and len(said) < 140


def test_loader_workers_ignore_the_stop_signals_and_end_with_an_error_that_escapes():
    from torch.utils.data import DataLoader, Dataset

    from relreason.train.data import loader_batches
    from relreason.train.stop import ignore_stop_signals, stop_signals_held

    stop = {signal.SIGINT, signal.SIGTERM}

    class WhatTheWorkerHas(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
            return torch.tensor([signal.getsignal(signal.SIGTERM) == signal.SIG_IGN,
                                 signal.getsignal(signal.SIGINT) == signal.SIG_IGN, bool(held & stop), os.getpid()])

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with stop_signals_held():
        assert stop <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the hold ends with the block
    loader = DataLoader(WhatTheWorkerHas(), num_workers=1, worker_init_fn=ignore_stop_signals)
    with pytest.raises(RuntimeError, match="a backbone's bug"):
        with loader_batches(loader) as batches:
            ignored_term, ignored_int, held, pid = next(batches)[0].tolist()
            # The worker ignores both and holds neither back (a held signal would wait there for ever).
            assert (ignored_term, ignored_int, held) == (True, True, False)
            raise RuntimeError("a backbone's bug")
    # Shut down on the way out: a worker that ignores SIGTERM would otherwise keep the process from exiting.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the loader's worker is still running")


_DROPOUT_BACKBONE = '''
from torch import nn
from relreason.backbones import Conv4


def conv4_with_dropout():
    net = Conv4()
    net.flatten = nn.Sequential(nn.Flatten(), nn.Dropout(0.5))  # draws from the global generator every step
    return net
'''


def test_a_mid_epoch_resume_on_the_per_image_path_keeps_the_global_generator_in_step(tmp_path, monkeypatch):
    """A backbone with dropout draws from PyTorch's global generator, which a checkpoint keeps: a run resumed
    mid-epoch ends bit-identical only if nothing else drew from it (the DataLoader's worker seed did)."""
    (tmp_path / "dropout_backbone.py").write_text(_DROPOUT_BACKBONE)
    monkeypatch.syspath_prepend(str(tmp_path))

    def config(name):
        return PretrainConfig(dataset="digits", backbone="dropout_backbone:conv4_with_dropout", image_size=16,
                              num_views=2, batch_size=64, epochs=2, seed=5, augment="pil", num_workers=0,
                              checkpoint_every=8, keep_checkpoints=100, device="cpu", progress=False,
                              tensorboard=False, output_dir=str(tmp_path / name))

    pretrain(config("straight"))
    stopped = tmp_path / "stopped"
    pretrain(config("stopped"))
    # As if killed after the second epoch's step-8 checkpoint: what came after it is gone.
    for path in list_checkpoints(stopped):
        if path.name > "checkpoint-e0001-s0000008.pt":
            path.unlink()
    (stopped / "backbone.pt").unlink()
    pretrain(config("stopped"))
    assert_same_weights(tmp_path / "straight", stopped)
    assert losses(tmp_path / "straight") == losses(stopped)
