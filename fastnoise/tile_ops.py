"""The crossbar tile as a differentiable op: ``tile_linear`` and ``tile_conv2d``.

The arithmetic and the gradients are :mod:`fastnoise.tile`'s; the pure-PyTorch reference is
:func:`fastnoise.reference.tile_linear_forward` / ``tile_linear_backward``. This is one more
stage of the generate path: ``W + sigma z`` is written once in the compute dtype by the device's
generator (the C++ kernels on the CPU, Triton on CUDA), then each tile's matmul runs on its
columns; the backward regenerates it. Saved for backward: the input, the weight parameter itself,
the input ranges and, where the ADC clips, one byte per tile and output (how much gradient
passes there); never a copy of the weight. The output noise is drawn from the contract
(stream 5), so nothing of it is kept either.

Without an ADC bound the tiles' partial outputs need no per-tile step, so the forward is one
matmul of the DAC's output (tile by tile) with the noisy weight, plus the per-tile noise.
A convolution is the same op on its unfolded input (``F.unfold``), as aihwkit-lightning does it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backends, rng
from .functional import _check_common, _compute_dtype, _pair, _resolve_padding
from .reference import tile_wmax
from .spec import NoiseSpec
from .tile import STREAM_TILE_OUT, TileSpec

__all__ = ["tile_linear", "tile_conv2d", "update_input_range_"]


def _normals(seed: int, offset: int, rows: int, cols: int, device, dtype) -> Tensor:
    """The contract's z of stream 5, ``[rows, cols]`` float32, on the fastest generator (the C++
    kernels on the CPU; for float64 the reference, as the weight noise)."""
    if device.type == "cpu" and dtype != torch.float64:
        from . import _cpu

        if _cpu.available():
            return _cpu.normal_grid(seed, offset, rows, cols, STREAM_TILE_OUT)
    return rng.normal_grid(seed, offset, rows, cols, STREAM_TILE_OUT, device)


def _clip_quant(xs: Tensor, r, step) -> Tensor:
    """The tile's DAC input: ``xs`` clipped to ``[-r, r]`` and quantized to ``step`` (a new tensor)."""
    if r is None:
        return xs.clone() if step is None else torch.round(xs / step) * step
    out = torch.clamp(xs, -r, r)
    if step is not None:
        out.div_(step).round_().mul_(step)
    return out


class _Plan:
    """What one call computes per tile: sizes, ranges, DAC steps, bounds and noise scales."""

    def __init__(self, tile: TileSpec, weight2d: Tensor, input_range: Optional[Tensor], dtype,
                 outputs: bool = True):
        self.sizes = tile.sizes(weight2d.shape[1])
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        t = len(self.sizes)
        self.r = [None] * t
        if tile.input_range:
            ir = input_range.detach().to(dtype)
            self.r = [ir[i] for i in range(t)]
        need_w = outputs and (tile.out_bound is not None or tile.out_noise > 0)
        wmax = tile_wmax(weight2d, self.sizes) if need_w else None
        self.step, self.bound, self.noise = [None] * t, [None] * t, [None] * t
        for i in range(t):
            r = self.r[i]
            if tile.inp_res is not None:
                self.step[i] = (2 * r) / tile.inp_res
            if wmax is not None and tile.out_bound is not None:
                w = wmax[i] if tile.bound_per_channel else wmax[i].max()
                self.bound[i] = ((r * tile.out_bound) * w.to(dtype)).reshape(1, -1)
            if wmax is not None and tile.out_noise > 0:
                w = wmax[i] if tile.out_noise_per_channel else wmax[i].max()
                self.noise[i] = (w.to(dtype) * (tile.out_noise / math.sqrt(t) * r)).reshape(1, -1)

        # on the CPU the ranges and DAC steps as Python floats holding the same (dtype-rounded)
        # values: torch's scalar kernels are several times faster than its 0-dim tensor ones
        self.rs, self.ss = self.r, self.step
        if weight2d.device.type == "cpu" and tile.input_range:
            self.rs = torch.stack(self.r).tolist()
            if tile.inp_res is not None:
                self.ss = torch.stack(self.step).tolist()

    def cols(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i] + self.sizes[i])


class _TileLinearFn(torch.autograd.Function):
    """``y = tile(x, W) + b`` (see the module docstring); x ``[M, K]``, weight ``[N, K]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, input_range, tile, sigma, mode, noise_bias, seed, offset,
                weight_noise, out_noise):
        dtype = x.dtype
        plan = _Plan(tile, weight, input_range, dtype)
        if weight_noise:
            wn = _backends.noisy_weight(weight, sigma, mode, seed, offset, dtype)
        else:
            wn = weight.detach().to(dtype)
        m, n, t = x.shape[0], weight.shape[0], len(plan.sizes)
        z = None
        if out_noise and tile.out_noise > 0:
            z = _normals(seed, int(offset), t * m, n, x.device, dtype).reshape(t, m, n)
        masks = None
        if tile.out_bound is None:  # no per-tile ADC: one matmul of the DAC's output
            if t == 1:
                xq = _clip_quant(x, plan.rs[0], plan.ss[0])
            else:
                xq = torch.empty_like(x)
                for i in range(t):
                    c = plan.cols(i)
                    xq[:, c] = _clip_quant(x[:, c], plan.rs[i], plan.ss[i])
            y = xq @ wn.t()
            del xq
            if z is not None:
                for i in range(t):
                    y.addcmul_(z[i].to(dtype), plan.noise[i])
        else:
            # 2 inside the bound, 1 exactly at it (half the gradient passes there, as torch's clamp
            # with tensor bounds gives it), 0 beyond: one byte per tile and output
            masks = torch.empty((t, m, n), dtype=torch.uint8, device=x.device)
            y = None
            for i in range(t):
                c = plan.cols(i)
                p = _clip_quant(x[:, c], plan.rs[i], plan.ss[i]) @ wn[:, c].t()
                if z is not None:
                    p.addcmul_(z[i].to(dtype), plan.noise[i])
                b = plan.bound[i]
                if tile.out_res is not None:
                    s = (2 * b) / tile.out_res
                    p.div_(s.clamp_min(torch.finfo(dtype).tiny)).round_().mul_(s)
                a = p.abs()
                torch.le(a, b, out=masks[i].view(torch.bool))  # 1 where |q| <= b
                masks[i].add_(torch.lt(a, b))  # 2 where |q| < b
                del a
                p.clamp_(-b, b)
                y = p if y is None else y.add_(p)
        del wn
        if bias is not None:
            if weight_noise and noise_bias:
                y = y + _backends.noisy_bias(bias, sigma, mode, seed, offset, dtype)
            else:
                y = y + bias.to(dtype)
        ctx.save_for_backward(x, weight, input_range, sigma, offset, masks)
        ctx.args = (tile, mode, seed, weight_noise)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, input_range, sigma, offset, masks = ctx.saved_tensors
        tile, mode, seed, weight_noise = ctx.args
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        dtype = x.dtype
        g = grad.contiguous().to(dtype)
        plan = _Plan(tile, weight, input_range, dtype, outputs=False)
        t = len(plan.sizes)
        wn = None
        if need_x or need_r:
            wn = (_backends.noisy_weight(weight, sigma, mode, seed, offset, dtype) if weight_noise
                  else weight.detach().to(dtype))
        xq = None
        if need_w:
            xq = _clip_quant(x, plan.rs[0], plan.ss[0]) if t == 1 else torch.empty_like(x)
            for i in range(t if t > 1 else 0):
                c = plan.cols(i)
                xq[:, c] = _clip_quant(x[:, c], plan.rs[i], plan.ss[i])
        gx = dw = None
        if masks is None:
            gx = g @ wn if wn is not None else None
            dw = g.t() @ xq if need_w else None
        else:
            half = g * 0.5  # the masks hold 2 inside the bound, 1 at it
            gx = torch.empty_like(x) if wn is not None else None
            dw = torch.empty((weight.shape[0], x.shape[1]), dtype=dtype, device=x.device) if need_w else None
            for i in range(t):
                c = plan.cols(i)
                gt = half * masks[i]
                if gx is not None:  # written in place: the column block is a BLAS operand as it is
                    torch.mm(gt, wn[:, c], out=gx[:, c])
                if dw is not None:
                    torch.mm(gt.t(), xq[:, c], out=dw[:, c])
        del wn, xq
        dr = None
        if gx is not None and tile.input_range:
            dr = torch.zeros(t, dtype=input_range.dtype, device=x.device) if need_r else None
            for i in range(t):
                c = plan.cols(i)
                xs, r = x[:, c], plan.rs[i]
                gc = gx[:, c]
                if dr is not None:
                    upper, lower = xs >= r, xs <= -r
                    v = r * (torch.where(upper, gc, 0).clamp_(max=0).sum()
                             - torch.where(lower, gc, 0).clamp_(min=0).sum())
                    if tile.decay > 0:
                        share = 1.0 - torch.logical_or(upper, lower).sum() / upper.numel()
                        v = v + tile.decay * r * (share > tile.input_min_percentage)
                    dr[i] = v
                gc.mul_(xs.abs() <= r)  # the clip passes the gradient where |x| <= r
        db = None
        if need_b:
            db = g.sum(0, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(ctx.bias_dtype)
        return ((gx if need_x else None), (dw.to(weight.dtype) if need_w else None), db, dr) + (None,) * 8


def update_input_range_(input_range: Tensor, counts: Tensor, x2: Tensor, tile: TileSpec) -> None:
    """Initialisation from data (a training forward): while a tile has seen fewer than
    ``tile.init_from_data`` batches, its range becomes the running mean of
    ``init_std_alpha * std(x)`` of its input (aihwkit-lightning's rule; batches whose tile input
    has std 0 do not count)."""
    if tile.init_from_data == 0 or not tile.input_range:
        return
    c = counts.tolist()
    if min(c) >= tile.init_from_data:
        return
    sizes = tile.sizes(x2.shape[-1])
    with torch.no_grad():
        k0 = 0
        for i, n in enumerate(sizes):
            idx = c[i]
            if idx < tile.init_from_data:
                std = x2[..., k0:k0 + n].std()
                if std > 0.0:
                    new = (input_range.data[i].float() * idx + tile.init_std_alpha * std.float()) / (idx + 1)
                    input_range.data[i] = new.to(input_range.dtype)
                    counts[i] += 1
                input_range.data[i] = input_range.data[i].abs()
            k0 += n


def tile_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], input_range: Optional[Tensor],
                tile: TileSpec, spec: Optional[NoiseSpec] = None, seed: int = 0, offset=0, *,
                out_noise: bool = True, update: Optional[Tensor] = None) -> Tensor:
    """``F.linear`` through the crossbar tile ``tile`` (:mod:`fastnoise.tile`), with the weight
    noise of ``spec`` (None or ``eta == 0``: none) and the output noise (``out_noise``) drawn
    from ``(seed, offset)``. ``input_range``: ``[T]``, one range per tile (None when
    ``tile.input_range`` is off). Gradients reach ``input``, ``weight``, ``bias`` and
    ``input_range`` by the straight-through definitions. ``update``: the layer's count of batches
    seen by the initialisation from data (a training forward): the ranges are first updated
    from this input (:func:`update_input_range_`)."""
    from .functional import _cached_sigma, _offset_tensor

    if not isinstance(tile, TileSpec):
        raise TypeError(f"tile must be a fastnoise.TileSpec, got {type(tile).__name__}")
    _check_common(input, weight, bias, spec)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension must be in_features={weight.shape[1]}, "
                         f"got input shape {tuple(input.shape)}")
    t = len(tile.sizes(weight.shape[1]))
    if update is not None and input_range is not None:
        update_input_range_(input_range, update, input.detach(), tile)
    if tile.input_range:
        if not isinstance(input_range, Tensor) or input_range.shape != (t,):
            got = tuple(input_range.shape) if isinstance(input_range, Tensor) else input_range
            raise ValueError(f"input_range must be a tensor of shape ({t},) (one range per tile), "
                             f"got {got!r}")
        if not bool((input_range.detach() > 0).all()):
            raise ValueError(f"input_range must be > 0, got {input_range.detach().tolist()}")
    rng.check_seed(seed)
    dtype = _compute_dtype(input, weight)
    x = input if input.dtype == dtype else input.to(dtype)
    weight_noise = spec is not None and spec.eta > 0
    if weight_noise:
        sigma, mode, noise_bias = _cached_sigma(spec, weight, bias), spec.mode, spec.noise_bias
    else:
        sigma, mode, noise_bias = weight.new_zeros(1, dtype=torch.float32), 0, False
    off = _offset_tensor(offset, weight.device)
    x2 = x.reshape(-1, x.shape[-1])
    y = _TileLinearFn.apply(x2, weight, bias, input_range if tile.input_range else None, tile, sigma,
                            mode, bool(noise_bias and bias is not None), seed, off, weight_noise,
                            bool(out_noise))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def tile_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                groups: int, input_range: Optional[Tensor], tile: TileSpec,
                spec: Optional[NoiseSpec] = None, seed: int = 0, offset=0, *, out_noise: bool = True,
                update: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d`` through the crossbar tile: :func:`tile_linear` of the unfolded input
    (``K = in * kh * kw`` in the GEMM view's order), ``groups == 1``."""
    if groups != 1:
        raise ValueError(f"the crossbar tile supports conv2d with groups=1 only, got groups={groups}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    x, pad = _resolve_padding(x, weight, padding, dilation, stride)
    kh, kw = weight.shape[2], weight.shape[3]
    n, _, h, w_ = x.shape
    oh = (h + 2 * pad[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w_ + 2 * pad[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=pad, stride=stride)  # [N, K, L]
    x2 = cols.transpose(1, 2)  # [N, L, K]
    y = tile_linear(x2, weight.reshape(weight.shape[0], -1), bias, input_range, tile, spec, seed, offset,
                    out_noise=out_noise, update=update)  # [N, L, O]
    y = y.transpose(1, 2).reshape(n, weight.shape[0], oh, ow)
    return y.squeeze(0) if unbatched else y
