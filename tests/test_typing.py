"""The type hints that the package ships (py.typed) are checked: its own code, and the README's Python examples
as a user's type checker reads them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from mypy import api

ROOT = Path(__file__).resolve().parent.parent
# PyTorch's own hints change from release to release: the package is checked against those of the dev extra's torch.
PINNED_TORCH = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
pytestmark = pytest.mark.skipif(torch.__version__.split("+")[0] != PINNED_TORCH,
                                reason=f"type hints are checked against torch {PINNED_TORCH}, the dev extra's")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for the module's checks: the package is analysed once, not for each."""
    return tmp_path_factory.mktemp("mypy-cache")


def _mypy(cache: Path, *targets: str) -> tuple[int, str]:
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), *targets])
    return status, stdout + stderr


def test_package_type_checks(cache):
    status, report = _mypy(cache, str(ROOT / "src" / "relreason"))
    assert status == 0, report


def test_readme_python_examples_type_check(tmp_path, cache):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 3  # loading an export into torchvision, and the two loops of the Python API section
    paths = []
    for number, block in enumerate(blocks):
        path = tmp_path / f"readme_example_{number}.py"
        path.write_text(block)
        paths.append(str(path))
    status, report = _mypy(cache, *paths)
    assert status == 0, report


def test_type_errors_are_reported(tmp_path, cache):
    """The check above can fail: a user's call against the package's hints that is wrong is found."""
    wrong = tmp_path / "wrong.py"
    wrong.write_text("from relreason import relation_pair_indices\n\nleft, right = relation_pair_indices(4, 8)\n"
                     "relation_pair_indices('4', 8)\n")
    status, report = _mypy(cache, str(wrong))
    assert status == 1
    assert "Too many values to unpack" in report or "too many values to unpack" in report.lower()
    assert 'incompatible type "str"; expected "int"' in report
