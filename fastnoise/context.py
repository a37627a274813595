"""``with fastnoise.noise(...)``: turn noise on (eval included) or off, override the spec."""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from .spec import NoiseSpec

__all__ = ["noise", "current"]

MAX_DRAW = 2**32  # a draw is the 32-bit offset word of the noise counter


@dataclass(frozen=True)
class NoiseOverride:
    enabled: bool
    changes: tuple  # (field, value) pairs applied to each module's spec
    draw: Optional[int]
    seed: Optional[int] = None  # draws: the global noise seed to use instead of initial_seed()
    # draws: the draw as an int64 tensor, the offset compiled graphs read (an int would be a
    # constant of the graph: one recompilation per chip)
    draw_tensor: Optional[torch.Tensor] = None
    has_draw: bool = False  # what compiled code branches on (not on the draw's value)
    # hardware=: the chip model, the time (s) and the reads so far per weight in this block
    hardware: Optional[object] = None
    t: float = 0.0
    reads: Optional[dict] = None

    def next_read(self, key) -> int:
        """The read number of this use of weight ``key`` in this block (0, 1, 2, ...)."""
        n = self.reads.get(key, 0)
        self.reads[key] = n + 1
        return n

    def apply(self, spec: NoiseSpec) -> NoiseSpec:
        if not self.changes:
            return spec
        if torch.compiler.is_compiling():  # dynamo warns about lru_cache wrappers
            return spec.replace(**dict(self.changes))
        return _replaced(spec, self.changes)


@functools.lru_cache(maxsize=1024)
def _replaced(spec: NoiseSpec, changes: tuple) -> NoiseSpec:
    """``spec`` with ``changes`` applied; specs are frozen, so one object serves every call."""
    return spec.replace(**dict(changes))


class _ThreadState(threading.local):
    """What ``noise(...)`` blocks and noise scopes have set, per thread (as ``torch.no_grad`` and
    ``autocast`` are): one thread's block never changes another thread's forwards. A thread
    started inside a block starts with none. (dynamo traces the attribute reads and guards on them.)"""

    def __init__(self) -> None:
        self.stack: list[NoiseOverride] = []
        # the noise scopes (fastnoise.intercept) active now: the layers' fast paths step out of them
        self.scopes: list = []


local = _ThreadState()


def current() -> Optional[NoiseOverride]:
    stack = local.stack
    return stack[-1] if stack else None


@contextlib.contextmanager
def noise(eta: Optional[float] = None, scale: Optional[str] = None,
          noise_bias: Optional[bool] = None, *, enabled: bool = True, draw: Optional[int] = None,
          seed: Optional[int] = None, hardware=None, t: Optional[float] = None):
    """Control the noise of every fastnoise layer inside the block, in train and eval mode.

    - ``with fastnoise.noise():`` noise on with each layer's own spec, also in eval mode.
    - ``with fastnoise.noise(eta=0.06, scale="absmax"):`` noise on, those fields overridden.
    - ``with fastnoise.noise(enabled=False):`` no noise at all (a clean pass in train mode).
    - ``draw=k``: every call inside sees the same noise, draw ``k`` of a stream kept apart from
      training's, and layer call counters do not advance: one simulated chip, so a whole
      evaluation pass sees one fixed set of noisy weights. Chip ``k`` of a weight is a function of
      (``seed``, the weight's id, ``k``); ``seed`` defaults to :func:`fastnoise.initial_seed`.
    - ``hardware=fastnoise.PCM(), t=seconds, draw=k``: instead of Gaussian noise, every noisy
      weight is chip ``k`` of that hardware model at ``t`` seconds after programming (its
      programming error and drift fixed by the chip, the read noise fresh for each use: reads are
      counted per weight from 0 in each block), in train and eval mode (see ``docs/chip.md``).
      ``draw`` defaults to 0; ``t`` is required.
    """
    changes = tuple((k, v) for k, v in (("eta", eta), ("scale", scale), ("noise_bias", noise_bias))
                    if v is not None)
    if changes:
        NoiseSpec().replace(**dict(changes))  # validate now, not at the first forward
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    if draw is not None and (isinstance(draw, bool) or not isinstance(draw, int) or not 0 <= draw < MAX_DRAW):
        raise ValueError(f"draw must be an int in [0, 2**32) (the counter word it takes), got {draw!r}")
    if seed is not None:
        if draw is None:
            raise ValueError("seed= chooses the chips of draw=k; give draw too")
        from .rng import check_seed

        check_seed(seed)
    if hardware is not None:
        from .hardware.base import HardwareModel, check_time

        if isinstance(hardware, str):
            from .hardware import by_name

            hardware = by_name(hardware)
        if not isinstance(hardware, HardwareModel):
            raise TypeError(f"hardware must be a fastnoise hardware model (e.g. fastnoise.PCM()) or "
                            f"its name, got {type(hardware).__name__}")
        if t is None:
            raise ValueError("hardware= needs t=, the seconds since programming (e.g. t=3600)")
        t = check_time(t)
        if changes:
            raise ValueError(f"hardware= replaces the Gaussian noise; do not give {dict(changes)} too")
        if not enabled:
            raise ValueError("hardware= with enabled=False: give one or the other")
        if draw is None:
            draw = 0
    elif t is not None:
        raise ValueError(f"t={t!r} is the time on a chip: give hardware= too (e.g. fastnoise.PCM())")
    draw_tensor = None
    if draw is not None:
        with torch.inference_mode(False):
            draw_tensor = torch.tensor(draw, dtype=torch.int64)
    stack = local.stack  # this thread's, also when the block ends
    stack.append(NoiseOverride(enabled, changes, draw, seed, draw_tensor, draw is not None,
                               hardware, 0.0 if t is None else t, {} if hardware is not None else None))
    try:
        yield
    finally:
        stack.pop()
