"""Pure-PyTorch reference of every noisy op, on any device.

Tests and benchmarks import these functions, so the kernels and the reference can never drift
apart: each kernel must reproduce them on the same ``(seed, offset)``.

Math runs in float32 (float64 for float64 weights); the noisy weight is rounded once to the
compute dtype, as the kernels do.
"""

from __future__ import annotations

import math

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


# ----------------------------------------------------------------------------- the crossbar tile
def tile_wmax(w2d: torch.Tensor, sizes) -> torch.Tensor:
    """``max_j |W[i, j]|`` over each tile's columns: ``[T, out]`` in float32 (float64 for float64)."""
    out, k0 = [], 0
    for n in sizes:
        w = w2d[:, k0:k0 + n].detach()
        out.append(torch.maximum(w.amax(1), -w.amin(1)).to(_math_dtype(w2d)))  # no |W| temporary
        k0 += n
    return torch.stack(out)


def tile_out_normals(seed, offset, tiles: int, m: int, n: int, device=None) -> torch.Tensor:
    """The output noise's z: ``[T, M, N]``, row ``t * M + m`` of stream 5 (the contract's)."""
    from .tile import STREAM_TILE_OUT

    return normal_grid(seed, offset, tiles * m, n, STREAM_TILE_OUT, device).reshape(tiles, m, n)


def _tile_steps(tile, r, wmax_t, tiles: int, dtype):
    """(DAC step, ADC bound [1, N] or None, output-noise scale [1, N] or None) of one tile."""
    step = (2 * r) / tile.inp_res if tile.inp_res is not None else None
    bound = noise = None
    if tile.out_bound is not None:
        w = wmax_t if tile.bound_per_channel else wmax_t.max()
        bound = ((r * tile.out_bound) * w.to(dtype)).reshape(1, -1)
    if tile.out_noise > 0:
        w = wmax_t if tile.out_noise_per_channel else wmax_t.max()
        noise = (w.to(dtype) * (tile.out_noise / math.sqrt(tiles) * r)).reshape(1, -1)
    return step, bound, noise


def _tile_forward(x2, w2, wn2, input_range, tile, z):
    """(y without bias, [(x clip masks, DAC input, ADC mask)] per tile) of the tile in x2's dtype."""
    dtype = x2.dtype
    sizes = tile.sizes(w2.shape[1])
    wmax = tile_wmax(w2, sizes)
    y = x2.new_zeros(x2.shape[0], w2.shape[0])
    per, k0 = [], 0
    for t, n in enumerate(sizes):
        xs = x2[:, k0:k0 + n]
        r = input_range[t].detach().to(dtype) if tile.input_range else None
        upper = lower = None
        if r is not None:
            upper, lower = xs >= r, xs <= -r
            xs = torch.minimum(torch.maximum(xs, -r), r)
        step, bound, noise = _tile_steps(tile, r, wmax[t], len(sizes), dtype)
        if step is not None:
            xs = torch.round(xs / step) * step
        p = xs @ wn2[:, k0:k0 + n].t()
        if noise is not None and z is not None:
            p = p + noise * z[t].to(dtype)
        mask = None
        if bound is not None:
            if tile.out_res is not None:
                s = (2 * bound) / tile.out_res
                p = torch.round(p / s.clamp_min(torch.finfo(dtype).tiny)) * s
            # the gradient that passes the ADC clip: 1 inside, 1/2 exactly at the bound (where the
            # top level often lands; torch's clamp with tensor bounds splits a tie), 0 beyond
            mask = ((p > -bound) & (p < bound)).to(dtype) + 0.5 * (p.abs() == bound).to(dtype)
            p = torch.minimum(torch.maximum(p, -bound), bound)
        y = y + p
        per.append((upper, lower, xs, mask))
        k0 += n
    return y, per


def _tile_reference(x, weight, input_range, tile, sigma, mode, seed, offset, weight_noise, out_noise):
    """What the reference's forward and backward share: ``x [M, K]``, the clean and the noisy
    weight, the tile sizes and :func:`_tile_forward`'s ``(y, per-tile state)`` on the same noise."""
    x2 = x.reshape(-1, x.shape[-1])
    w2 = weight.detach().to(x.dtype)
    wn2 = noisy_weight(weight, sigma, mode, seed, offset, x.dtype) if weight_noise else w2
    sizes = tile.sizes(w2.shape[1])
    z = None
    if out_noise and tile.out_noise > 0:
        z = tile_out_normals(seed, offset, len(sizes), x2.shape[0], w2.shape[0], x.device)
    return x2, w2, wn2, sizes, _tile_forward(x2, w2, wn2, input_range, tile, z)


def tile_linear_forward(x, weight, bias, input_range, tile, sigma, mode, noise_bias, seed, offset,
                        weight_noise: bool = True, out_noise: bool = True) -> torch.Tensor:
    """The crossbar tile's ``y`` (:mod:`fastnoise.tile`) in ``x.dtype``: weight ``[N, K]``,
    ``x [..., K]``; ``weight_noise`` adds ``sigma z`` (stream 0), ``out_noise`` the tile's output
    noise (stream 5) when ``tile.out_noise > 0``."""
    x2, w2, _, _, (y, _) = _tile_reference(x, weight, input_range, tile, sigma, mode, seed, offset,
                                           weight_noise, out_noise)
    if bias is not None:
        b = (noisy_bias(bias, sigma, mode, seed, offset, x.dtype) if weight_noise and noise_bias
             else bias.detach().to(x.dtype))
        y = y + b
    return y.reshape(*x.shape[:-1], w2.shape[0])


def tile_linear_backward(grad, x, weight, input_range, tile, sigma, mode, seed, offset,
                         weight_noise: bool = True, out_noise: bool = True):
    """Gradients ``(dx, dW, db, d input_range)`` of :func:`tile_linear_forward` by the
    straight-through definitions of :mod:`fastnoise.tile` (aihwkit-lightning's)."""
    g2 = grad.reshape(-1, weight.shape[0]).to(x.dtype)
    x2, w2, wn2, sizes, (_, per) = _tile_reference(x, weight, input_range, tile, sigma, mode, seed,
                                                   offset, weight_noise, out_noise)
    dx, dw = torch.zeros_like(x2), torch.zeros_like(w2)
    dr = torch.zeros(len(sizes), dtype=x.dtype, device=x.device) if tile.input_range else None
    k0 = 0
    for t, n in enumerate(sizes):
        upper, lower, xq, mask = per[t]
        gt = g2 if mask is None else g2 * mask
        gx = gt @ wn2[:, k0:k0 + n]
        dw[:, k0:k0 + n] = gt.t() @ xq
        if upper is not None:
            r = input_range[t].detach().to(x.dtype)
            dr[t] = r * (gx[upper].clamp(max=0).sum() - gx[lower].clamp(min=0).sum())
            if tile.decay > 0:
                share = 1.0 - (upper | lower).sum() / upper.numel()
                dr[t] += tile.decay * r * (share > tile.input_min_percentage)
            gx = gx * ~((upper | lower) & (x2[:, k0:k0 + n].abs() != r))
        dx[:, k0:k0 + n] = gx
        k0 += n
    return dx.reshape(x.shape), dw.to(weight.dtype), g2.sum(0), dr
