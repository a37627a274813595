"""What a hardware model is, and the noise streams it draws from.

A hardware model turns a weight (its 2-D GEMM view ``[out, K]``, as :mod:`fastnoise.rng`
defines it) into the weight a chip computes with: ``model.effective_weight(w, key, chip, t,
read)`` is chip ``chip``'s weight at ``t`` seconds after programming, seen by read number
``read``. Nothing is stored: every random number it uses is a pure function of
``(key, chip, element)`` (what was programmed, how each device drifts) or of
``(key, chip, read, element)`` (the noise of one read), drawn from the one Philox contract
(:func:`fastnoise.rng.normal_grid`) on streams of their own:

- programming error: stream 2, key ``key``, counter ``(c // 8, d * out + r, 2, chip)``, two
  normals per element (device ``d`` = 0 holds ``g+``, 1 holds ``g-``);
- drift exponent nu: stream 3, key ``key``, counter ``(c // 8, r, 3, chip)``, one normal;
- read noise: stream 4, key ``read_key(key, chip) = mix64(key, 0x7EAD, chip)``, counter
  ``(c // 8, r, 4, read)``, one normal.

``key`` is the weight's chip key, the one ``fastnoise.noise(draw=k)`` uses for Gaussian noise
(``mix64(seed, weight id, draw tag)``, see :mod:`fastnoise.modules`); the chip number ``k`` is the
counter's last word, as for a Gaussian draw. Rows and columns are the element's in the ``[out, K]``
view, so a tile of the weight (rows ``r0..``, columns ``c0..``) draws the same numbers as the whole.

The computation here is the pure-PyTorch reference; the layers hand it a faster generator of
the same normals (the C++ one on the CPU, the Triton one on a GPU), see
:mod:`fastnoise._hardware_ops`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from .. import rng

__all__ = ["STREAM_PROG", "STREAM_DRIFT", "STREAM_READ", "HardwareModel", "HardwareRead",
           "NormalFn", "reference_normal", "read_key", "check_time"]

STREAM_PROG = 2
STREAM_DRIFT = 3
STREAM_READ = 4
_READ_TAG = 0x7EAD  # read noise: the chip goes into the key, the read into the counter

# (key, offset, rows, cols, stream, device) -> float32 [rows, cols]: the contract's z
NormalFn = Callable[[int, int, int, int, int, torch.device], torch.Tensor]


def reference_normal(key: int, offset: int, rows: int, cols: int, stream: int,
                     device: torch.device) -> torch.Tensor:
    """The contract's z from the pure-PyTorch implementation (:func:`fastnoise.rng.normal_grid`)."""
    return rng.normal_grid(key, offset, rows, cols, stream=stream, device=device)


def read_key(key: int, chip: int) -> int:
    """The Philox key of chip ``chip``'s read noise (the read number is the counter's offset)."""
    return rng.mix64(key, _READ_TAG, chip)


def check_time(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"t (seconds after programming) must be a finite number >= 0, got {t!r}")
    return float(t)


def check_chip(chip) -> int:
    if isinstance(chip, bool) or not isinstance(chip, int) or not 0 <= chip < 2**32:
        raise ValueError(f"chip must be an int in [0, 2**32), got {chip!r}")
    return chip


class HardwareModel:
    """A device model a chip is made of. Subclasses give :attr:`name` and
    :meth:`effective_weight`; they are frozen dataclasses, so one object describes a chip design
    and can be hashed, compared and shared between models."""

    name = "hardware"

    def effective_weight(self, weight: torch.Tensor, key: int, chip: int, t: float, read: int,
                         normal: Optional[NormalFn] = None) -> torch.Tensor:
        """Chip ``chip``'s version of ``weight`` (``[out, K]``) at ``t`` seconds, read ``read``."""
        raise NotImplementedError


@dataclass(frozen=True)
class HardwareRead:
    """One use of a weight on a chip: what the layers pass where a :class:`NoiseSpec` would go."""

    model: HardwareModel
    t: float
    chip: int
    read: int
