"""The config files shipped inside the package (the paper's settings and ready ones), so ``--config`` can name
them after a plain ``pip install``, from any folder."""

from __future__ import annotations

import difflib
from pathlib import Path

from relreason.errors import RelreasonError

CONFIG_DIR = Path(__file__).parent / "configs"
_SUFFIXES = (".yaml", ".yml")


def bundled_config_names() -> list[str]:
    """Names of the shipped configs (file names without ``.yaml``), sorted."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def is_bundled(path: Path) -> bool:
    """Whether ``path`` is one of the shipped configs (all of them ``relreason pretrain`` configs)."""
    return path.parent.resolve() == CONFIG_DIR.resolve()


def bundled_config_summary(name: str) -> str:
    """The first line of a shipped config's opening comment, for ``relreason list``."""
    for line in (CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").rstrip()
    return ""


def resolve_config(value: str) -> Path:
    """The file ``--config value`` means: a path to an existing file, else a shipped config's name.

    A file on disk always wins, so a user's own ``digits_conv4.yaml`` in the working folder is theirs, not
    ours; a folder does not (a run folder may well be named after its config).  A name may carry ``.yaml``
    (``digits_conv4`` and ``digits_conv4.yaml`` are the same config).
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = path.name
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    names = bundled_config_names()
    if path.parent == Path(".") and name in names:
        return CONFIG_DIR / f"{name}.yaml"
    if path.exists():  # a folder, say: reading it gives the error that names what it is
        return path
    near = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise RelreasonError(
        f"config file {value} not found{hint}; give the path of a YAML file or the name of a shipped config "
        f"(`relreason list` shows them)"
    )
