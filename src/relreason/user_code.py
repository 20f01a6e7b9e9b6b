"""A user's own code named on the command line as ``package.module:name`` (a backbone factory, a method class),
imported from the working folder or PYTHONPATH, with one-line errors that name the file and line at fault."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from types import ModuleType
from typing import Any

from relreason.errors import RelreasonError, short_reason


class UserCodeNotFound(RelreasonError):
    """The module a ``package.module:name`` names is not importable from here."""


def code_folder(spec: str) -> str | None:
    """The folder that ``spec``'s module was imported from, the one to put on PYTHONPATH for it (an absolute path),
    or None for a registered name or a module not imported yet."""
    module_name = spec.partition(":")[0] if isinstance(spec, str) and ":" in spec else None
    module = sys.modules.get(module_name) if module_name else None
    file = getattr(module, "__file__", None)
    if not file or module_name is None:
        return None
    path = os.path.abspath(file)
    depth = module_name.count(".") + (2 if os.path.basename(path) == "__init__.py" else 1)
    for _ in range(depth):
        path = os.path.dirname(path)
    return path


def import_named(spec: str, what: str, role: str, form: str) -> Any:
    """The object ``spec`` (``package.module:name``) names. ``what`` names it in errors ("backbone factory"),
    ``role`` says what it serves ("backbone"), ``form`` is the spelling to suggest ("package.module:function")."""
    module_name, _, attribute = spec.partition(":")
    hint = f"give '{form}' importable from the working folder or PYTHONPATH"
    try:
        module = _import_from_here(module_name)
    except ModuleNotFoundError as error:
        if not _names_the_module(error, module_name):  # the module is there; something it imports is not
            raise RelreasonError(_raised_on_import(spec, module_name, error, role)) from None
        raise UserCodeNotFound(f"cannot load {what} '{spec}' ({error}); {hint}") from None
    except (ValueError, TypeError) as error:  # '' or '.rel': not a module name
        raise RelreasonError(f"cannot load {what} '{spec}' ({error}); {hint}") from None
    except (Exception, SystemExit) as error:  # the user's module raised as it was imported: its bug, at its line
        raise RelreasonError(_raised_on_import(spec, module_name, error, role)) from None
    found = getattr(module, attribute, None)
    if found is None:
        raise RelreasonError(
            f"cannot load {what} '{spec}' (module '{module_name}' ({module.__file__}) has no '{attribute}'); {hint}"
        )
    return found


def _names_the_module(error: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the module missing is ``module_name`` or a package above it (not one that it imports)."""
    parts = module_name.split(".")
    return error.name in {".".join(parts[: i + 1]) for i in range(len(parts))}


def _raised_on_import(spec: str, module_name: str, error: BaseException, role: str) -> str:
    """One line for an error raised by a user's module as it was imported, naming the file and line."""
    if isinstance(error, SyntaxError) and error.filename:
        where, reason = f"{error.filename}, line {error.lineno}", f"SyntaxError: {error.msg}"
    else:
        # The outermost frame outside this file and the import machinery: the user's line that set it off.
        machinery = (__file__, importlib.__file__)
        frames = [f for f in traceback.extract_tb(error.__traceback__)
                  if f.filename not in machinery and not f.filename.startswith("<frozen")]
        where = f"{frames[0].filename}, line {frames[0].lineno}" if frames else module_name
        reason = short_reason(error, None)
    return f"importing '{module_name}' for {role} '{spec}' failed at {where}: {reason}; fix that module"


def _import_from_here(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        here = os.getcwd()
        if error.name != module_name.split(".")[0] or "" in sys.path or here in sys.path:
            raise
    # Not found, and the working folder is not searched: under the installed `relreason` command (and torchrun's
    # workers) it is not, under `python -m relreason` it is. Searched last, so it shadows nothing installed.
    sys.path.append(here)
    return importlib.import_module(module_name)
