"""Maps a requested path to an implementation: a namespace with ``forward`` and ``backward``
taking the arguments of :mod:`fastnoise.reference`'s functions of the same op.

Linear paths are chosen in :mod:`fastnoise._backends_linear`, conv2d paths in
:mod:`fastnoise._backends_conv`.
"""

from __future__ import annotations

from types import SimpleNamespace

from . import reference

REFERENCE_LINEAR = SimpleNamespace(name="reference", forward=reference.linear_forward,
                                   backward=reference.linear_backward)
REFERENCE_CONV2D = SimpleNamespace(name="reference", forward=reference.conv2d_forward,
                                   backward=reference.conv2d_backward)


def linear_impl(path, x, weight, backward=False):
    from ._backends_linear import choose

    return choose(path, x, weight, backward)


def conv2d_impl(path, x, weight, geometry, backward=False):
    from ._backends_conv import choose

    return choose(path, x, weight, geometry, backward)


def generated_bias(bias, sigma, mode, noise_bias, seed, offset, dtype):
    """The bias a ``generate`` path adds: ``b + sigma z_b`` from the Triton kernel when the spec
    noises the bias, else ``b`` in the compute dtype; None stays None."""
    if bias is None:
        return None
    if noise_bias:
        from .kernels import noise_gen

        return noise_gen.noisy_bias(bias, sigma, mode, seed, offset, dtype)
    return bias.detach().to(dtype)
