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

    for mode in ("fp32", "bf16"):
        _, _, speedup, per_backbone = cells["relreason", mode]
        ours = views_per_s(("relreason", mode))
        assert ours > 0
        # The printed ratios follow from the printed rates (the times are rounded to whole milliseconds).
        assert abs(float(speedup) - ours / views_per_s(("reference", "fp32"))) <= 0.02 * float(speedup) + 0.01
        assert abs(float(per_backbone) - views_per_s(("backbone only", mode)) / ours) <= 0.02 * float(per_backbone) + 0.01
