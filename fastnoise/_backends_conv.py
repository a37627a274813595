"""Path choice for noisy conv2d."""

from __future__ import annotations

from . import dispatch
from ._backends import REFERENCE_CONV2D


def choose(path, x, weight, geometry, backward=False):
    if path == "reference":
        return REFERENCE_CONV2D
    ok, why = dispatch.triton_usable(x)
    if not ok:
        if path != "auto":
            dispatch.fall_back("noisy_conv2d", path, why)
        return REFERENCE_CONV2D
    if path != "auto":
        dispatch.fall_back("noisy_conv2d", path, "no Triton kernel for this path yet")
    return REFERENCE_CONV2D
