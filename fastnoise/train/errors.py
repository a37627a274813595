"""The training layer's user-error type, at the bottom of :mod:`fastnoise.train`.

It imports nothing of the package, so every training module (settings, data, models, run
folders, checkpoints) can raise it without importing another (``tests/test_layering.py``
refuses import cycles).
"""

from __future__ import annotations

__all__ = ["ConfigError", "first_line"]


class ConfigError(ValueError):
    """A user error in a configuration, its data or its files (the CLI prints it and exits 2)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """``TypeName: first line of the message`` (torch's messages can run over many lines)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__
