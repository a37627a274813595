"""Chips: hardware models whose chips are numbers, not stored copies (see :mod:`fastnoise.hardware.base`)."""

from .base import (
    STREAM_DRIFT,
    STREAM_PROG,
    STREAM_READ,
    HardwareModel,
    HardwareRead,
    read_key,
    reference_normal,
)
from .pcm import PCM

__all__ = ["HardwareModel", "HardwareRead", "PCM", "STREAM_PROG", "STREAM_DRIFT", "STREAM_READ",
           "read_key", "reference_normal", "by_name", "NAMES"]

NAMES = {"pcm": PCM}


def by_name(name: str) -> HardwareModel:
    """The hardware model called ``name`` with its defaults (``"pcm"``)."""
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise ValueError(f"unknown hardware model {name!r}; known: {sorted(NAMES)}")
    return NAMES[name.lower()]()
