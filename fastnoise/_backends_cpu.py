"""The CPU ``auto`` path: C++ writes ``W + sigma z``, then torch's BLAS / oneDNN op runs.

:func:`fastnoise._cpu.noisy_weight` (``csrc/``) writes the noisy weight once, in the compute
dtype and the weight's memory format, with no temporaries of the weight's size; ``F.linear`` /
``F.conv2d`` consume it and it is dropped right after (never saved). The backward regenerates it
for the input gradient; ``dW`` and ``db`` are straight-through, computed as the reference does.
This is the ``generate`` path of the GPU with the C++ generator in place of the Triton kernel.

Taken by ``path="auto"`` on CPU tensors of float32 / bfloat16 / float16 (weights of those
dtypes too) when the library is built (:func:`fastnoise._cpu.available`); float64, or no
library, runs the reference. ``path="reference"`` always runs the reference.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import _cpu, dispatch, reference


def _bias(bias, sigma, mode, noise_bias, seed, offset, dtype):
    if bias is None:
        return None
    if noise_bias:
        return _cpu.noisy_bias(bias, sigma, mode, seed, offset, dtype)
    return bias.detach().to(dtype)


def _linear_forward(x, weight, bias, sigma, mode, noise_bias, seed, offset):
    wn = _cpu.noisy_weight(weight, sigma, mode, seed, offset, x.dtype)
    return F.linear(x, wn, _bias(bias, sigma, mode, noise_bias, seed, offset, x.dtype))


def _linear_backward(grad, x, weight, sigma, mode, seed, offset, need_x, need_w, need_b):
    dx = None
    if need_x:
        wn = _cpu.noisy_weight(weight, sigma, mode, seed, offset, grad.dtype)
        dx = (grad.reshape(-1, weight.shape[0]) @ wn).reshape(x.shape)
        del wn
    _, dw, db = reference.linear_backward(grad, x, weight, sigma, mode, seed, offset,
                                          False, need_w, need_b)
    return dx, dw, db


def _conv_forward(x, weight, bias, sigma, mode, noise_bias, seed, offset, stride, padding,
                  dilation, groups):
    wn = _cpu.noisy_weight(weight, sigma, mode, seed, offset, x.dtype)
    b = _bias(bias, sigma, mode, noise_bias, seed, offset, x.dtype)
    return F.conv2d(x, wn, b, stride, padding, dilation, groups)


def _conv_backward(grad, x, weight, sigma, mode, seed, offset, stride, padding, dilation, groups,
                   need_x, need_w, need_b):
    if need_x:
        w = _cpu.noisy_weight(weight, sigma, mode, seed, offset, grad.dtype)
    else:  # convolution_backward reads only the shape for grad weight
        w = torch.empty_like(weight, dtype=grad.dtype)
    dx, dw, db = torch.ops.aten.convolution_backward(
        grad, x, w, [weight.shape[0]] if need_b else None, stride, padding, dilation,
        False, [0, 0], groups, [need_x, need_w, need_b],
    )
    del w
    return dx, (dw.to(weight.dtype) if need_w else None), db


CPU_LINEAR = SimpleNamespace(name="cpu", forward=_linear_forward, backward=_linear_backward)
CPU_CONV2D = SimpleNamespace(name="cpu", forward=_conv_forward, backward=_conv_backward)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C++ path can take this CPU call (dtypes, and the library built)."""
    return (x.device.type == "cpu" and x.dtype in dispatch.KERNEL_DTYPES
            and weight.dtype in dispatch.KERNEL_DTYPES and _cpu.available())
