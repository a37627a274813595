"""Maps a requested path to an implementation: a namespace with ``forward`` and ``backward``
taking the arguments of :mod:`fastnoise.reference`'s functions of the same op.

Linear paths are chosen in :mod:`fastnoise._backends_linear`, conv2d paths in
:mod:`fastnoise._backends_conv`, the CPU's C++ path lives in :mod:`fastnoise._backends_cpu`.
:func:`noisy_weight` / :func:`noisy_bias` give ``W + sigma z`` of any layer's weight on its
device's fastest generator, for layer kinds without an op of their own.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import dispatch, reference

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


def _cpu_generator(t) -> bool:
    from . import _cpu

    return (t.device.type == "cpu" and t.dtype in dispatch.KERNEL_DTYPES and _cpu.available())


def noisy_weight(weight, sigma, mode, seed, offset, dtype):
    """``W + sigma z`` in ``weight``'s shape, in ``dtype``, for a weight of any rank (its GEMM
    view ``[shape[0], prod(shape[1:])]``, as :func:`fastnoise.reference.noisy_weight`).

    CUDA: the Triton kernel (:func:`fastnoise.kernels.noise_gen.noisy_weight`); CPU: the C++
    kernels when built (:mod:`fastnoise._cpu`), else the reference; float64 (either side) or
    another device: the reference. ``offset``: an int or a one-element int64 tensor.
    """
    if dtype in dispatch.KERNEL_DTYPES and weight.dtype in dispatch.KERNEL_DTYPES:
        if weight.device.type == "cuda" and dispatch.triton_usable(weight)[0]:
            wn = triton_noisy_weight(weight, sigma, mode, seed, offset, dtype)
            if wn is not None:
                return wn
        elif _cpu_generator(weight):
            from . import _cpu

            return _cpu.noisy_weight(weight, sigma, mode, seed, offset, dtype)
    return reference.noisy_weight(weight, sigma, mode, seed, offset, dtype)


def noisy_bias(bias, sigma, mode, seed, offset, dtype):
    """``b + sigma z_b`` (row 0 of stream 1, each element with its channel's sigma), in ``dtype``;
    devices and dtypes as :func:`noisy_weight`."""
    if dtype in dispatch.KERNEL_DTYPES and bias.dtype in dispatch.KERNEL_DTYPES:
        if bias.device.type == "cuda" and dispatch.triton_usable(bias)[0]:
            from .kernels import noise_gen

            return noise_gen.noisy_bias(bias, sigma, mode, seed, _offset_tensor(offset, bias.device), dtype)
        if _cpu_generator(bias):
            from . import _cpu

            return _cpu.noisy_bias(bias, sigma, mode, seed, offset, dtype)
    return reference.noisy_bias(bias, sigma, mode, seed, offset, dtype)


def _offset_tensor(offset, device):
    if isinstance(offset, torch.Tensor):
        return offset
    return torch.tensor(int(offset) & 0xFFFFFFFF, dtype=torch.int64, device=device)


def triton_noisy_weight(weight, sigma, mode, seed, offset, dtype):
    """:func:`fastnoise.kernels.noise_gen.noisy_weight` for a weight of any rank (seen as 2-D or
    4-D), or None when its strides allow no such view."""
    from .kernels import noise_gen

    w4 = _as_4d(weight)
    if w4 is None:
        return None
    return noise_gen.noisy_weight(w4, sigma, mode, seed, _offset_tensor(offset, weight.device),
                                  dtype).view(weight.shape)


def _as_4d(weight):
    """A 2-D or 4-D view of ``weight`` with the same GEMM view (a trailing unit dim added, or the
    middle dims of a 5-D+ weight merged when its strides allow), or None."""
    if weight.dim() in (2, 4):
        return weight
    if weight.dim() in (1, 3):
        return weight.unsqueeze(-1)
    try:
        return weight.view(weight.shape[0], weight.shape[1], -1, weight.shape[-1])
    except RuntimeError:
        return None


def generated_bias(bias, sigma, mode, noise_bias, seed, offset, dtype):
    """The bias a ``generate`` path adds: ``b + sigma z_b`` from the Triton kernel when the spec
    noises the bias, else ``b`` in the compute dtype; None stays None."""
    if bias is None:
        return None
    if noise_bias:
        from .kernels import noise_gen

        return noise_gen.noisy_bias(bias, sigma, mode, seed, offset, dtype)
    return bias.detach().to(dtype)
