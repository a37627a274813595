"""Path choice for noisy linear."""

from __future__ import annotations

from . import dispatch
from ._backends import REFERENCE_LINEAR


def choose(path, x, weight, backward=False):
    if path == "reference":
        return REFERENCE_LINEAR
    ok, why = dispatch.triton_usable(x)
    if not ok:
        if path != "auto":
            dispatch.fall_back("noisy_linear", path, why)
        return REFERENCE_LINEAR
    if path != "auto":
        dispatch.fall_back("noisy_linear", path, "no Triton kernel for this path yet")
    return REFERENCE_LINEAR
