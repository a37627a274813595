"""Maps a requested path to an implementation (a namespace with ``forward`` and ``backward``)."""

from __future__ import annotations

from types import SimpleNamespace

from . import dispatch, reference

REFERENCE_LINEAR = SimpleNamespace(forward=reference.linear_forward, backward=reference.linear_backward)
REFERENCE_CONV2D = SimpleNamespace(forward=reference.conv2d_forward, backward=reference.conv2d_backward)


def linear_impl(path, x, weight, backward=False):
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


def conv2d_impl(path, x, weight, geometry, backward=False):
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
