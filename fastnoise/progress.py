"""Progress: a tqdm bar on a terminal, plain lines elsewhere.

A bar redraws itself with carriage returns, which a redirected log (``fastnoise demo > log``,
CI, a batch job) keeps as hundreds of updates. So a bar is drawn only when stderr is a terminal
(or in a Jupyter kernel, where tqdm draws a widget); otherwise :class:`PlainProgress` writes one
line every ``every`` steps (by default a tenth of the total, so at most about ten lines per bar)
and none with ``\\r``.
"""

from __future__ import annotations

import math
import sys
from typing import Optional, TextIO

__all__ = ["progress_bar", "PlainProgress", "is_terminal"]


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    """Whether a bar can be drawn: ``stream`` (default stderr) is a TTY, or a Jupyter kernel runs."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return tty or "ipykernel" in sys.modules


class PlainProgress:
    """The non-terminal stand-in of a tqdm bar (``update``, ``set_postfix``, ``write``,
    ``close``, a context manager): ``desc: n/total (p%) key=value`` every ``every`` steps and
    at the last one, on ``stream`` (default stderr)."""

    def __init__(self, total: int, desc: str = "", initial: int = 0, every: Optional[int] = None,
                 stream: Optional[TextIO] = None):
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.every = max(1, math.ceil(self.total / 10)) if every is None else max(1, int(every))
        self.stream = stream
        self.postfix = ""
        self._last = self.n

    def _out(self) -> TextIO:
        return sys.stderr if self.stream is None else self.stream

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n // self.every != self._last // self.every or (self.n >= self.total > self._last):
            self._last = self.n
            pct = f" ({100 * self.n // self.total}%)" if self.total else ""
            post = f" {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: {self.n}/{self.total}{pct}{post}", file=self._out(), flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def write(self, message: str) -> None:
        print(message)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str = "", initial: int = 0, every: Optional[int] = None):
    """A tqdm bar (``leave=False``) on a terminal, else a :class:`PlainProgress`."""
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
    return PlainProgress(total, desc, initial, every)
