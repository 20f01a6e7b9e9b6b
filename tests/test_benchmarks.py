"""The throughput benchmark runs end to end and prints a table whose ratios follow from its own rows."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_prints_consistent_rows():
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--backbones", "conv4", "--views", "2",
               "--batch-size", "4", "--modes", "fp32", "bf16", "--steps", "2", "--warmup", "1", "--dataset", "synthetic"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| conv4")]
    cells = {(row[2].strip(), row[3].strip()): [c.strip() for c in row[4:]] for row in rows}
    assert set(cells) == {("reference", "fp32"), ("relreason", "fp32"), ("backbone only", "fp32"),
                          ("relreason", "bf16"), ("backbone only", "bf16")}
    def views_per_s(key):
        return int(cells[key][1].replace(",", ""))

    def follows_from(printed, numerator, denominator):
        """The printed ratio (2 decimals) lies within what the printed rates (whole views/s) allow: on a busy
        machine a rate of a few views/s makes its rounding alone worth several percent."""
        low = (numerator - 0.5) / (denominator + 0.5)
        high = (numerator + 0.5) / max(denominator - 0.5, 1e-9)
        return low * 0.98 - 0.005 <= float(printed) <= high * 1.02 + 0.005

    for mode in ("fp32", "bf16"):
        _, _, speedup, per_backbone = cells["relreason", mode]
        ours = views_per_s(("relreason", mode))
        assert ours > 0
        # The printed ratios follow from the printed rates (the times are rounded to whole milliseconds).
        assert follows_from(speedup, ours, views_per_s(("reference", "fp32"))), (speedup, cells)
        assert follows_from(per_backbone, views_per_s(("backbone only", mode)), ours), (per_backbone, cells)


def test_a_failing_row_is_reported_and_the_others_still_run():
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--backbones", "no_such_net", "conv4",
               "--views", "2", "--batch-size", "4", "--modes", "fp32", "--steps", "1", "--warmup", "0",
               "--dataset", "synthetic", "--skip-reference"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1
    assert "| no_such_net | 2 | FAILED |" in result.stdout and "no_such_net" in result.stdout.split("FAILED")[1]
    assert "| conv4 | 2 | relreason | fp32 |" in result.stdout


def test_device_check_script_runs_its_steps_tiny_on_the_cpu(tmp_path):
    """The prepared GPU check, run small on the CPU: every step runs and leaves its file."""
    import os

    environment = os.environ | {"DEVICE": "cpu", "QUICK": "1"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(tmp_path)], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    files = {path.name: path.read_text() for path in tmp_path.iterdir()}
    assert set(files) == {"machine.txt", "throughput_conv4.md", "throughput_conv4_compile.md", "throughput_resnet32.md",
                          "pretrain.log", "evaluate.md", "evaluation.json"}
    assert "| conv4 | 2 | relreason | bf16 |" in files["throughput_conv4_compile.md"]
    assert "| reference |" not in files["throughput_conv4_compile.md"]
    assert "torch" in files["machine.txt"]
    assert "| conv4 | 2 | relreason | bf16 |" in files["throughput_conv4.md"]
    assert "| resnet32 | 2 | backbone only | fp32 |" in files["throughput_resnet32.md"]
    # The epoch ends, or on a busy machine the time limit stops it first: either way the backbone is exported.
    assert "done: 1 epoch(s)" in files["pretrain.log"] or "stopped during epoch 1" in files["pretrain.log"]
    assert "backbone exported to" in files["pretrain.log"] or "exported the current backbone" in files["pretrain.log"]
    assert "| pretrained |" in files["evaluate.md"] and "| random " in files["evaluate.md"]


def test_a_step_that_waits_for_the_device_is_reported_timed_unchecked_and_fails_the_run(monkeypatch, capsys):
    """CUDA's sync check cannot fire on a CPU, so the check is replaced by one that always fires."""
    import contextlib

    import pytest

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import throughput

    checking = []

    @contextlib.contextmanager
    def checked(device):
        checking.append(True)
        try:
            yield
        finally:
            checking.pop()

    # The sync fires where it is likeliest, while the views are made: inside the generator that yields them.
    make_views = throughput.DeviceMultiViewDataset.views

    def views_that_sync(self, *args, **kwargs):
        if checking:
            raise RuntimeError("called a synchronizing CUDA operation")
        return make_views(self, *args, **kwargs)

    monkeypatch.setattr(throughput, "no_host_sync", checked)
    monkeypatch.setattr(throughput.DeviceMultiViewDataset, "views", views_that_sync)
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--backbones", "conv4", "--views", "2", "--batch-size", "4",
                                      "--modes", "fp32", "--steps", "1", "--warmup", "1", "--dataset", "synthetic",
                                      "--skip-reference"])
    with pytest.raises(SystemExit) as exit_info:
        throughput.main()
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "# SYNC: relreason's conv4 K=2 step waited for the device" in out
    assert "at test_benchmarks.py:" in out and "views_that_sync <- " in out  # where it waited
    assert "| conv4 | 2 | relreason | fp32 |" in out and "| conv4 | 2 | backbone only | fp32 |" in out


def test_a_reference_whose_workers_die_is_retried_with_fewer_and_the_other_rows_still_run(monkeypatch, capsys):
    """Where shared memory is small, many DataLoader workers die: the reference is retried with at most 4."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import throughput

    real = throughput.reference_step_factory
    tried = []

    def dies_with_many_workers(backbone_name, images, num_views, batch_size, workers, device):
        tried.append(workers)
        if workers > 4:
            raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Bus error.")
        return real(backbone_name, images, num_views, batch_size, 0, device)

    monkeypatch.setattr(throughput, "reference_step_factory", dies_with_many_workers)
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--backbones", "conv4", "--views", "2", "--batch-size", "4",
                                      "--modes", "fp32", "--steps", "1", "--warmup", "1", "--dataset", "synthetic",
                                      "--reference-workers", "16"])
    throughput.main()
    out = capsys.readouterr().out
    assert tried == [16, 4]  # 4 works here: the one without workers (no shared memory) is not needed
    assert "# reference conv4 K=2 with 16 DataLoader workers failed: RuntimeError: DataLoader worker" in out
    assert "| conv4 | 2 | reference, 4 workers | fp32 |" in out
    row = next(line for line in out.splitlines() if line.startswith("| conv4 | 2 | relreason | fp32 |"))
    assert row.split("|")[7].strip()  # the ratio to the reference is there


def test_jpeg_decoding_benchmark_prints_a_row_per_use_and_size_with_the_sizes_decoded():
    command = [sys.executable, str(ROOT / "benchmarks" / "jpeg_decoding.py"), "--count", "2", "--width", "1600",
               "--height", "1200"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines()
            if line.startswith(("| centre", "| K=4"))]
    # The short side asked is 4 x the size over the smallest crop's side (1 for the centre square, sqrt(0.08 x 3/4)
    # for the views): 128 px keeps 1/8; 523 and 384 px, 1/2; 1,568 px, the whole photo.
    assert [(row[0].split()[0], row[1], row[5]) for row in rows] == [
        ("centre", "32", "200x150"), ("K=4", "32", "800x600"), ("centre", "96", "800x600"), ("K=4", "96", "1600x1200")]
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) > 0 and row[4].endswith("x")
