"""Maps a requested path to an implementation: a namespace with ``forward`` and ``backward``
taking the arguments of :mod:`fastnoise.reference`'s functions of the same op.

Linear paths are chosen in :mod:`fastnoise._backends_linear`, conv2d paths in
:mod:`fastnoise._backends_conv`, the CPU's C++ path lives in :mod:`fastnoise._backends_cpu`.
:func:`noisy_weight` / :func:`noisy_bias` give ``W + sigma z`` of any layer's weight on its
device's fastest generator, for layer kinds without an op of their own (they live in
:mod:`fastnoise._backends_base`, which every backend imports; this module is the front the ops
call).
"""

from __future__ import annotations

from . import _backends_conv, _backends_linear
from ._backends_base import (
    REFERENCE_CONV2D,
    REFERENCE_LINEAR,
    generated_bias,
    noisy_bias,
    noisy_weight,
    triton_noisy_weight,
)

__all__ = ["REFERENCE_LINEAR", "REFERENCE_CONV2D", "linear_impl", "conv2d_impl", "noisy_weight", "noisy_bias",
           "triton_noisy_weight", "generated_bias"]


def linear_impl(path, x, weight, backward=False):
    return _backends_linear.choose(path, x, weight, backward)


def conv2d_impl(path, x, weight, geometry, backward=False):
    return _backends_conv.choose(path, x, weight, geometry, backward)
