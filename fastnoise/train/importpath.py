"""Import paths (``package.module:attribute``) that recipes use to name the user's own model
builders (``model.arch``, ``teacher.arch``) and datasets (``data.dataset``)."""

from __future__ import annotations

import importlib
import re

from .errors import ConfigError

__all__ = ["is_import_path", "import_object"]

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(name) -> bool:
    """``"package.module:attribute"`` (the attribute may be dotted: ``mod:Class.method``)."""
    return isinstance(name, str) and bool(_IMPORT_PATH.match(name))


def import_object(path: str, what: str):
    """The callable an import path names.

    A :class:`ConfigError` naming ``what`` (the setting) and the path if the module cannot be
    imported (or raises while it runs), the attribute is missing or it is not callable.
    """
    module_name, _, attr = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it runs
        raise ConfigError(f"{what} {path!r}: cannot import {module_name!r} "
                          f"({type(e).__name__}: {e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what} {path!r} is a {type(obj).__name__}, not a callable")
    return obj
