"""What every backend shares: the reference paths, ``W + sigma z`` of any weight on its device's
generator, and the conv layout rules (the bottom of the backend layer: the per-op path choice in
:mod:`fastnoise._backends_linear` / :mod:`fastnoise._backends_conv`, the CPU path in
:mod:`fastnoise._backends_cpu` and the Triton kernels import from here, never the reverse).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import dispatch, reference

REFERENCE_LINEAR = SimpleNamespace(name="reference", forward=reference.linear_forward,
                                   backward=reference.linear_backward)
REFERENCE_CONV2D = SimpleNamespace(name="reference", forward=reference.conv2d_forward,
                                   backward=reference.conv2d_backward)


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


def generate_paths(generator, name: str):
    """The ``generate`` paths of a noise generator: write ``W + sigma z`` (and the noisy bias) in
    the compute dtype, then the clean op; the backward regenerates it for dx, dW and db
    straight-through. ``generator()`` returns an object with ``noisy_weight`` and ``noisy_bias``
    (the Triton kernels, the C++ ops), imported on the first call. Returns ``(linear, conv2d)``
    backends and the bias helper."""

    def bias_for(bias, sigma, mode, noise_bias, seed, offset, dtype):
        """``b + sigma z_b`` when the spec noises the bias, else ``b`` in the compute dtype."""
        if bias is None:
            return None
        if noise_bias:
            return generator().noisy_bias(bias, sigma, mode, seed, offset, dtype)
        return bias.detach().to(dtype)

    def linear_forward(x, weight, bias, sigma, mode, noise_bias, seed, offset):
        wn = generator().noisy_weight(weight, sigma, mode, seed, offset, x.dtype)
        y = F.linear(x, wn, bias_for(bias, sigma, mode, noise_bias, seed, offset, x.dtype))
        del wn  # |W| in the compute dtype, freed before the next layer allocates its own
        return y

    def linear_backward(grad, x, weight, sigma, mode, seed, offset, need_x, need_w, need_b):
        dx = None
        if need_x:
            wn = generator().noisy_weight(weight, sigma, mode, seed, offset, grad.dtype)
            dx = (grad.reshape(-1, weight.shape[0]) @ wn).reshape(x.shape)
            del wn
        _, dw, db = reference.linear_backward(grad, x, weight, sigma, mode, seed, offset,
                                              False, need_w, need_b)
        return dx, dw, db

    def conv_forward(x, weight, bias, sigma, mode, noise_bias, seed, offset, stride, padding,
                     dilation, groups):
        wn = generator().noisy_weight(weight, sigma, mode, seed, offset, x.dtype)
        b = bias_for(bias, sigma, mode, noise_bias, seed, offset, x.dtype)
        y = F.conv2d(x, wn, b, stride, padding, dilation, groups)
        del wn  # short-lived: back to the allocator before the next layer
        return y

    def conv_backward(grad, x, weight, sigma, mode, seed, offset, stride, padding, dilation, groups,
                      need_x, need_w, need_b):
        """dx with the forward's noise (regenerated), dW and db straight-through."""
        if need_x:
            w = generator().noisy_weight(weight, sigma, mode, seed, offset, grad.dtype)
        else:  # convolution_backward reads only the shape for grad weight
            w = torch.empty_like(weight, dtype=grad.dtype)
        dx, dw, db = torch.ops.aten.convolution_backward(
            grad, x, w, [weight.shape[0]] if need_b else None, stride, padding, dilation,
            False, [0, 0], groups, [need_x, need_w, need_b],
        )
        del w
        return dx, (dw.to(weight.dtype) if need_w else None), db

    return (SimpleNamespace(name=name, forward=linear_forward, backward=linear_backward),
            SimpleNamespace(name=name, forward=conv_forward, backward=conv_backward), bias_for)


def _triton_generator():
    from .kernels import noise_gen

    return noise_gen


GENERATE_LINEAR, GENERATE_CONV2D, generated_bias = generate_paths(_triton_generator, "generate")


# ----------------------------------------------------------------------------- conv layouts
def grad_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout of a gradient w.r.t. ``t`` (input or weight): ``t``'s own."""
    return torch.channels_last if _strides_like_channels_last(t) else torch.contiguous_format


def _strides_like_channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor's strides order it N, H, W, C (C fastest), as torch decides it for
    ``suggest_memory_format``: walk C, W, H, N with non-decreasing strides; an N111-like tensor
    whose C and N strides coincide counts as NCHW."""
    if t.dim() != 4 or t.stride(1) == 0:
        return False
    lowest = 0
    for d in (1, 3, 2, 0):
        size, stride = t.shape[d], t.stride(d)
        if size == 0 or stride < lowest:
            return False
        if d == 0 and lowest == t.stride(1):
            return False
        lowest = stride * size if size > 1 else stride
    return True


def conv_output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The noisy conv's output layout: channels_last when the input's or the weight's strides
    are channels_last-like (cuDNN's and oneDNN's rule), else contiguous. The op's fake and all
    paths follow it, so ``torch.compile`` sees the strides it is told."""
    if x.dtype != torch.float64 and (_strides_like_channels_last(x) or _strides_like_channels_last(weight)):
        return torch.channels_last
    return torch.contiguous_format


def conv_out_hw(h, w, weight, stride, padding, dilation):
    """Output height and width of a 2-D convolution (explicit int padding)."""
    kh, kw = weight.shape[2], weight.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


def conv_output_shape(x, weight, geometry) -> tuple:
    """``(N, Cout, OH, OW)``."""
    stride, padding, dilation, _ = geometry
    oh, ow = conv_out_hw(x.shape[-2], x.shape[-1], weight, stride, padding, dilation)
    return x.shape[0], weight.shape[0], max(oh, 0), max(ow, 0)


def output_pixels(x, weight, geometry) -> int:
    """``M = N * OH * OW`` of the conv's implicit GEMM."""
    n, _, oh, ow = conv_output_shape(x, weight, geometry)
    return n * oh * ow
