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


def _gemm_2d(t):
    """Weights of more than 4 dims (Conv3d) seen as their 2-D GEMM view for the kernels."""
    return t if t.dim() <= 4 else t.reshape(t.shape[0], -1)


def noisy_weight(weight, sigma, mode, seed, offset, dtype):
    """``W + sigma z`` in ``weight``'s shape and ``dtype``, for any weight of >= 2 dims: the Triton
    kernel on CUDA, the reference elsewhere (the generic path of every layer kind without a fused
    op: RNN weights, attention projections, Conv1d/3d, transposed convs, ...)."""
    from . import dispatch

    if (weight.device.type == "cuda" and dispatch.triton_usable(weight)[0]
            and dtype in dispatch.KERNEL_DTYPES and weight.dtype in dispatch.KERNEL_DTYPES):
        from .kernels import noise_gen

        w = _gemm_2d(weight.detach())
        if w.dim() == 3:
            w = w.reshape(w.shape[0], -1)
        return noise_gen.noisy_weight(w, sigma, mode, seed, offset, dtype).reshape(weight.shape)
    return reference.noisy_weight(weight, sigma, mode, seed, offset, dtype)


def noisy_bias(bias, sigma, mode, seed, offset, dtype):
    """``b + sigma z_b`` (the contract's bias stream), on the weight's backend."""
    from . import dispatch

    if (bias.device.type == "cuda" and dispatch.triton_usable(bias)[0]
            and dtype in dispatch.KERNEL_DTYPES and bias.dtype in dispatch.KERNEL_DTYPES):
        from .kernels import noise_gen

        return noise_gen.noisy_bias(bias.detach(), sigma, mode, seed, offset, dtype)
    return reference.noisy_bias(bias, sigma, mode, seed, offset, dtype)
