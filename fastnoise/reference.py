"""Pure-PyTorch reference of every noisy op, on any device.

Tests and benchmarks import these functions, so the kernels and the reference can never drift
apart: each kernel must reproduce them on the same ``(seed, offset)``.

Math runs in float32 (float64 for float64 weights); the noisy weight is rounded once to the
compute dtype, as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rng import STREAM_BIAS, STREAM_WEIGHT, normal_grid
from .spec import MODE_PROPORTIONAL, MODE_ROW, MODE_TENSOR

__all__ = [
    "noise_scale",
    "noisy_weight",
    "noisy_bias",
    "linear_forward",
    "linear_backward",
    "conv2d_forward",
    "conv2d_backward",
]


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def noise_scale(w2d: torch.Tensor, sigma: torch.Tensor, mode: int) -> torch.Tensor:
    """sigma broadcast against the 2-D weight ``[out, K]`` (or a bias seen as ``[out, 1]``)."""
    sigma = sigma.to(w2d.dtype)
    if mode == MODE_TENSOR:
        return sigma.reshape(1, 1)
    if mode == MODE_ROW:
        return sigma.reshape(-1, 1)
    if mode == MODE_PROPORTIONAL:
        return sigma.reshape(1, 1) * w2d.abs()
    raise ValueError(f"unknown noise mode {mode}")


def noisy_weight(weight, sigma, mode, seed, offset, dtype=None) -> torch.Tensor:
    """``W + sigma * z`` in ``weight``'s shape, rounded to ``dtype`` (default: weight's)."""
    out = weight.shape[0]
    w2 = weight.detach().reshape(out, -1).to(_math_dtype(weight))
    z = normal_grid(seed, offset, out, w2.shape[1], STREAM_WEIGHT, weight.device)
    wn = w2 + noise_scale(w2, sigma, mode) * z.to(w2.dtype)
    return wn.to(dtype or weight.dtype).reshape(weight.shape)


def noisy_bias(bias, sigma, mode, seed, offset, dtype=None) -> torch.Tensor:
    """``b + sigma * z_b``: the bias is row 0 of stream 1, its sigma that of its channel."""
    b = bias.detach().to(_math_dtype(bias)).reshape(-1, 1)
    z = normal_grid(seed, offset, 1, b.shape[0], STREAM_BIAS, bias.device).reshape(-1, 1)
    bn = b + noise_scale(b, sigma, mode) * z.to(b.dtype)
    return bn.reshape(-1).to(dtype or bias.dtype)


def _bias_for(bias, sigma, mode, noise_bias, seed, offset, dtype):
    if bias is None:
        return None
    if noise_bias:
        return noisy_bias(bias, sigma, mode, seed, offset, dtype)
    return bias.detach().to(dtype)


def linear_forward(x, weight, bias, sigma, mode, noise_bias, seed, offset) -> torch.Tensor:
    """``x @ (W + sigma z)^T + b``, in ``x.dtype``."""
    wn = noisy_weight(weight, sigma, mode, seed, offset, x.dtype)
    return F.linear(x, wn, _bias_for(bias, sigma, mode, noise_bias, seed, offset, x.dtype))


def linear_backward(grad, x, weight, sigma, mode, seed, offset, need_x, need_w, need_b):
    """Gradients of :func:`linear_forward`; dW and db are straight-through (sigma constant)."""
    k, n = x.shape[-1], weight.shape[0]
    g2 = grad.reshape(-1, n)
    dx = dw = db = None
    if need_x:
        dx = (g2 @ noisy_weight(weight, sigma, mode, seed, offset, grad.dtype)).reshape(x.shape)
    if need_w:
        dw = (g2.t() @ x.reshape(-1, k)).to(weight.dtype)
    if need_b:
        db = g2.sum(0, dtype=torch.float32 if g2.dtype != torch.float64 else torch.float64)
    return dx, dw, db


def conv2d_forward(x, weight, bias, sigma, mode, noise_bias, seed, offset, stride, padding,
                   dilation, groups) -> torch.Tensor:
    wn = noisy_weight(weight, sigma, mode, seed, offset, x.dtype)
    b = _bias_for(bias, sigma, mode, noise_bias, seed, offset, x.dtype)
    return F.conv2d(x, wn, b, stride, padding, dilation, groups)


def conv2d_backward(grad, x, weight, sigma, mode, seed, offset, stride, padding, dilation, groups,
                    need_x, need_w, need_b):
    """Gradients of :func:`conv2d_forward`: grad input with the same noise, dW straight-through."""
    # convolution_backward needs *a* weight for grad input and only its shape for grad weight
    w = noisy_weight(weight, sigma, mode, seed, offset, grad.dtype) if need_x else weight.to(grad.dtype)
    dx, dw, db = torch.ops.aten.convolution_backward(
        grad, x, w, [weight.shape[0]] if need_b else None, stride, padding, dilation,
        False, [0, 0], groups, [need_x, need_w, need_b],
    )
    return dx, (dw.to(weight.dtype) if need_w else None), db
