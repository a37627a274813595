"""The crossbar tile as a differentiable op: ``tile_linear`` and ``tile_conv2d``.

The arithmetic and the gradients are :mod:`fastnoise.tile`'s; the pure-PyTorch reference is
:func:`fastnoise.reference.tile_linear_forward` / ``tile_linear_backward``. This is one more
stage of the generate path: ``W + sigma z`` is written once in the compute dtype by the device's
generator (the C++ kernels on the CPU, Triton on CUDA), then each tile's matmul runs on its
columns; the backward regenerates it. Saved for backward: the input, the weight parameter itself,
the input ranges and, where the ADC clips, one byte per tile and output (how much gradient
passes there); never a copy of the weight. The output noise is drawn from the contract
(stream 5), so nothing of it is kept either.

The elementwise stages (the DAC, the per-tile ADC epilogue, the gradient mask, the input clip's
backward, the tiles' ``max |W|``) are one function each below: one C++ pass on the CPU for
float32 / float64 (``csrc/ops/cpu/tile_cpu.cpp``), PyTorch ops elsewhere, the same operations in
the reference's order. A training call takes sigma of the ``absmax`` scales from the tiles'
``max |W|``, which the ADC bound and the output noise need anyway.

Without an ADC bound the tiles' partial outputs need no per-tile step, so the forward is one
matmul of the DAC's output (tile by tile) with the noisy weight, plus the per-tile noise.
A convolution is the same op on its unfolded input (``F.unfold``), as aihwkit-lightning does it.

On CUDA the forward is instead the fused Triton kernel of ``kernels/tile_matmul.py`` (the same
numbers, the same masks saved; :data:`TILE_FORWARD` chooses).

The op is ``fastnoise::tile_linear`` (and ``fastnoise::tile_linear_backward``), registered with
``torch.library`` so that ``torch.compile(fullgraph=True)`` sees one node; eager calls on plain
tensors run the same functions through :class:`_TileLinearFn`, without the wrapper.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backends, rng
from .functional import (
    _check_linear,
    _compute_dtype,
    _empty_like_none,
    _pair,
    _resolve_padding,
    _tracing,
)
from .reference import tile_wmax
from .spec import NoiseSpec
from .tile import STREAM_TILE_OUT, TileSpec

__all__ = ["tile_linear", "tile_conv2d", "update_input_range_"]


def _kernels(x: Tensor):
    """``torch.ops.fastnoise_cpu`` where the tile's one-pass C++ stages run (a CPU tensor of
    float32 or float64, the kernels built), else None (the same stages in PyTorch)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        from . import _cpu

        if _cpu.available():
            return torch.ops.fastnoise_cpu
    return None


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


def _wmax(weight2d: Tensor, sizes, dtype, ops) -> Tensor:
    """Each tile's ``max |W|`` per output channel, ``[T, N]`` (:func:`fastnoise.reference.tile_wmax`):
    one pass over W in C++, two in PyTorch."""
    if ops is not None and weight2d.dtype == dtype:
        return ops.tile_absmax(weight2d.detach(), sizes)
    return tile_wmax(weight2d, sizes)


def _sigma_from_wmax(spec: NoiseSpec, wmax: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """``spec.sigma(weight, bias)`` from the tiles' ``max |W|`` (the same maxima, so the same
    value) for the ``absmax`` scales, else None; None too where it is not finite (``spec.sigma``
    then warns and says what it does)."""
    if spec.scale not in ("absmax", "absmax_per_channel"):
        return None
    m = wmax.amax(0).float()  # [N]
    b = bias.detach().float().abs() if spec.noise_bias and bias is not None else None
    if spec.scale == "absmax":
        m = m.max()
        b = None if b is None else b.max()
    if b is not None:
        m = torch.maximum(m, b)
    s = (m * spec.eta).reshape(-1)
    return s if bool(torch.isfinite(s).all()) else None


class _Plan:
    """What one call computes per tile, for all tiles at once: sizes, ranges and DAC steps
    (``[T]``), ADC bounds, ADC steps and output-noise scales (``[T, N]``, or ``[T, 1]`` per
    tensor), each with the reference's operations (:func:`fastnoise.reference._tile_steps`)."""

    def __init__(self, tile: TileSpec, weight2d: Tensor, input_range: Optional[Tensor], dtype,
                 outputs: bool = True, ops=None, wmax: Optional[Tensor] = None):
        self.sizes = tile.sizes(weight2d.shape[1])
        t = len(self.sizes)
        self.starts = [sum(self.sizes[:i]) for i in range(t)]
        r = step = None
        if tile.input_range:
            r = input_range.detach().to(dtype)  # [T]
            if tile.inp_res is not None:
                step = (2 * r) / tile.inp_res
        self.bound = self.adc_step = self.noise = None
        if outputs and (tile.out_bound is not None or tile.out_noise > 0):
            wmax = (_wmax(weight2d, self.sizes, dtype, ops) if wmax is None else wmax).to(dtype)  # [T, N]
            if tile.out_bound is not None:
                w = wmax if tile.bound_per_channel else wmax.amax(1, keepdim=True)
                self.bound = (r * tile.out_bound).unsqueeze(1) * w
                if tile.out_res is not None:
                    self.adc_step = (2 * self.bound) / tile.out_res
            if tile.out_noise > 0:
                w = wmax if tile.out_noise_per_channel else wmax.amax(1, keepdim=True)
                self.noise = w * (tile.out_noise / math.sqrt(t) * r).unsqueeze(1)
        self.rows = None  # the same as contiguous [T, N] (the C++ epilogue's rows), made once
        if ops is not None and self.bound is not None:
            n = weight2d.shape[0]
            self.rows = tuple(None if v is None else v.expand(t, n).contiguous()
                              for v in (self.bound, self.noise, self.adc_step))
        # the ranges and DAC steps per tile; on the CPU as Python floats holding the same
        # (dtype-rounded) values: torch's scalar kernels are several times faster than its 0-dim
        # tensor ones
        self.rs = self.ss = [None] * t
        if r is not None:
            cpu = weight2d.device.type == "cpu"
            self.rs = r.tolist() if cpu else list(r)
            if step is not None:
                self.ss = step.tolist() if cpu else list(step)

    def epilogue(self, i: int, rows: bool) -> tuple:
        """Tile ``i``'s (ADC bound, output-noise scale, ADC step), each None where the tile has
        none: ``[N]`` rows (``rows``) or ``[1, N]`` / ``[1, 1]`` against a ``[M, N]`` output."""
        if rows:
            return tuple(None if v is None else v[i] for v in self.rows)
        return tuple(None if v is None else v[i:i + 1] for v in (self.bound, self.noise, self.adc_step))

    def cols(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i] + self.sizes[i])


# ----------------------------------------------------------------------------- the stages
# Each stage once, in C++ (``ops``: one pass) or in PyTorch (``ops`` None: CUDA, bfloat16 /
# float16, or no C++ build); both compute the reference's operations in its order.
def _dac(x: Tensor, plan: _Plan, ops) -> Tensor:
    """The DAC's output of every tile, ``[M, K]`` (a new tensor)."""
    if ops is not None:
        return ops.tile_dac(x, plan.sizes, plan.rs if plan.rs[0] is not None else [],
                            plan.ss if plan.ss[0] is not None else [])
    if len(plan.sizes) == 1:
        return _clip_quant(x, plan.rs[0], plan.ss[0])
    xq = torch.empty_like(x)
    for i in range(len(plan.sizes)):
        c = plan.cols(i)
        xq[:, c] = _clip_quant(x[:, c], plan.rs[i], plan.ss[i])
    return xq


def _adc_(p: Tensor, y: Tensor, i: int, plan: _Plan, z: Optional[Tensor], mask: Tensor, ops) -> None:
    """Tile ``i``'s partial output ``p`` through the output noise (``z`` float32 or None), the
    ADC and its clip, into ``y`` (``p is y`` for the first tile: written in place, else added);
    ``mask`` (uint8) gets 2 inside the bound, 1 exactly at it, 0 beyond."""
    b, noise, s = plan.epilogue(i, rows=ops is not None)
    noise = noise if z is not None else None
    if ops is not None:
        ops.tile_adc_(p, y, p is not y, z, noise, b, s, mask)
        return
    if z is not None:
        p.addcmul_(z.to(p.dtype), noise)
    if s is not None:
        p.div_(s.clamp_min(torch.finfo(p.dtype).tiny)).round_().mul_(s)
    a = p.abs()
    torch.le(a, b, out=mask.view(torch.bool))  # 1 where |q| <= b
    mask.add_(torch.lt(a, b))  # 2 where |q| < b
    del a
    p.clamp_(-b, b)
    if p is not y:
        y.add_(p)


def _mask_grad(g: Tensor, mask: Tensor, ops) -> Tensor:
    """The gradient through the ADC clip: ``g`` where the mask is 2, ``g / 2`` where 1, else 0."""
    if ops is not None:
        return ops.tile_mask_grad(g, mask)
    return (g * 0.5) * mask


def _dac_backward_(x: Tensor, gx: Tensor, plan: _Plan, tile: TileSpec, need_r: bool, dtype, ops):
    """The input clip's gradient: ``gx`` zeroed in place where ``|x| > r``; returns the ranges'
    gradient ``[T]`` (None without ``need_r``)."""
    t = len(plan.sizes)
    if ops is not None:
        xc = x if x.stride(-1) == 1 else x.contiguous()
        sums = ops.tile_dac_backward_(xc, gx, plan.sizes, plan.rs).tolist()  # [T, 3] float64
        if not need_r:
            return None
        dr = []
        for i, (up, down, clipped) in enumerate(sums):
            r = plan.rs[i]
            v = r * (up - down)
            if tile.decay > 0:
                total = x.shape[0] * plan.sizes[i]
                share = 1.0 - clipped / total if total else math.nan  # as 0 / 0 in torch: no decay
                v += tile.decay * r * (share > tile.input_min_percentage)
            dr.append(v)
        return torch.tensor(dr, dtype=dtype)
    dr = torch.zeros(t, dtype=dtype, device=x.device) if need_r else None
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
    return dr


# ----------------------------------------------------------------------------- forward, backward
def _tile_fwd(x, weight, bias, input_range, wmax, tile, sigma, mode, noise_bias, seed, offset,
              weight_noise, out_noise):
    """``(y, masks)``: the tile's output ``[M, N]`` and, with an ADC bound, the uint8 masks
    ``[T, M, N]`` of its gradient (else an empty tensor). ``wmax``: the tiles' ``max |W|`` where
    the caller has it (for sigma), else None; ``tile``: a TileSpec or its encoding."""
    tile = _decode(tile)
    if _use_fused(x):  # CUDA: the fused Triton kernel (kernels/tile_matmul.py), same numbers
        y, masks = _fused_forward(x, weight, bias, input_range, tile, sigma, mode, noise_bias, seed,
                                  offset, weight_noise, out_noise)
        return y, (x.new_empty(0, dtype=torch.uint8) if masks is None else masks)
    dtype = x.dtype
    ops = _kernels(x)
    plan = _Plan(tile, weight, input_range, dtype, ops=ops, wmax=wmax)
    if weight_noise:
        wn = _backends.noisy_weight(weight, sigma, mode, seed, offset, dtype)
    else:
        wn = weight.detach().to(dtype)
    m, n, t = x.shape[0], weight.shape[0], len(plan.sizes)
    z = None
    if out_noise and tile.out_noise > 0:
        z = _normals(seed, int(offset), t * m, n, x.device, dtype).contiguous().reshape(t, m, n)
    xq = _dac(x, plan, ops)
    if tile.out_bound is None:  # no per-tile ADC: one matmul of the DAC's output
        masks = x.new_empty(0, dtype=torch.uint8)
        y = xq @ wn.t()
        if z is not None:
            for i in range(t):
                y.addcmul_(z[i].to(dtype), plan.epilogue(i, rows=False)[1])
    else:
        masks = torch.empty((t, m, n), dtype=torch.uint8, device=x.device)
        y = torch.empty((m, n), dtype=dtype, device=x.device)
        for i in range(t):
            c = plan.cols(i)
            # the first tile's matmul writes y, the others a partial output added into it
            p = torch.mm(xq[:, c], wn[:, c].t(), out=y) if i == 0 else xq[:, c] @ wn[:, c].t()
            _adc_(p, y, i, plan, None if z is None else z[i], masks[i], ops)
            del p
    del wn, xq
    if bias is not None:
        if weight_noise and noise_bias:
            y.add_(_backends.noisy_bias(bias, sigma, mode, seed, offset, dtype))
        else:
            y.add_(bias.detach().to(dtype))
    return y, masks


# ----------------------------------------------------------------------------- the fused kernel
# Which forward a layer on a tile runs: "auto" the fused Triton kernel (kernels/tile_matmul.py:
# DAC in its prologue, output noise and ADC in its per-tile epilogue) on CUDA tensors and the
# stages above elsewhere; "fused" the kernel on CPU tensors too (TRITON_INTERPRET=1: the tests);
# "composition" never the kernel. float64 always takes the stages above.
TILE_FORWARD = "auto"


def _use_fused(x: Tensor) -> bool:
    from . import dispatch

    if TILE_FORWARD not in ("auto", "fused", "composition"):
        raise ValueError(f"fastnoise.tile_ops.TILE_FORWARD must be 'auto', 'fused' or 'composition', "
                         f"got {TILE_FORWARD!r}")
    if TILE_FORWARD == "composition" or (TILE_FORWARD == "auto" and x.device.type != "cuda"):
        return False
    ok, why = dispatch.triton_usable(x)
    if ok and x.dtype not in dispatch.KERNEL_DTYPES:
        ok, why = False, f"the kernel takes float16, bfloat16 or float32, got {x.dtype}"
    if not ok and TILE_FORWARD == "fused":
        dispatch.warn_once(f"tile:{why}", f"fastnoise.tile_linear: the fused kernel is unavailable "
                           f"({why}); using the torch composition")
    return ok


def _fused_forward(x, weight, bias, input_range, tile, sigma, mode, noise_bias, seed, offset,
                   weight_noise, out_noise):
    """The kernel's ``(y, masks)``. The weight noise is drawn inside it where the linear layer's
    ``auto`` would run its fused kernel (few rows), else ``W + sigma z`` is generated once and read."""
    from . import _backends_linear
    from .kernels import tile_matmul

    wn = None
    if weight_noise and _backends_linear.auto_path(x) != "fused":
        wn = _backends.noisy_weight(weight, sigma, mode, seed, offset, x.dtype)
    return tile_matmul.tile_matmul_fwd(x, weight, bias, input_range, tile, sigma, mode, noise_bias,
                                       seed, offset, weight_noise=weight_noise, out_noise=out_noise,
                                       noisy_weight=wn)


def _tile_bwd(grad, x, weight, input_range, tile, sigma, mode, seed, offset, masks, weight_noise,
              need_x, need_w, need_b, need_r):
    """``(dx, dW, db, d input_range)``, each None where not needed."""
    tile = _decode(tile)
    dtype = x.dtype
    ops = _kernels(x)
    g = grad.contiguous().to(dtype)
    plan = _Plan(tile, weight, input_range, dtype, outputs=False, ops=ops)
    t = len(plan.sizes)
    wn = None
    if need_x or need_r:
        wn = (_backends.noisy_weight(weight, sigma, mode, seed, offset, dtype) if weight_noise
              else weight.detach().to(dtype))
    xq = _dac(x, plan, ops) if need_w else None
    gx = dw = None
    if masks.numel() == 0:
        gx = g @ wn if wn is not None else None
        dw = g.t() @ xq if need_w else None
    else:
        gx = torch.empty(x.shape, dtype=dtype, device=x.device) if wn is not None else None
        dw = torch.empty((weight.shape[0], x.shape[1]), dtype=dtype, device=x.device) if need_w else None
        for i in range(t):
            c = plan.cols(i)
            gt = _mask_grad(g, masks[i], ops)
            if gx is not None:  # written in place: the column block is a BLAS operand as it is
                torch.mm(gt, wn[:, c], out=gx[:, c])
            if dw is not None:
                torch.mm(gt.t(), xq[:, c], out=dw[:, c])
    del wn, xq
    dr = None
    if gx is not None and tile.input_range:
        dr = _dac_backward_(x, gx, plan, tile, need_r, input_range.dtype, ops)
    db = None
    if need_b:
        db = g.sum(0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return gx, (dw.to(weight.dtype) if need_w else None), db, dr


# ----------------------------------------------------------------------------- the op
# The op's arguments must be schema types: the TileSpec travels as the floats of _FIELDS (None as
# NaN, bools as 0 / 1) and is rebuilt, once per distinct spec, inside.
_FIELDS = ("max_input_size", "inp_res", "out_res", "out_bound", "bound_per_channel", "out_noise",
           "out_noise_per_channel", "input_range", "decay", "input_min_percentage")
_decoded: dict = {}


def _encode(tile: TileSpec) -> list:
    return [math.nan if getattr(tile, f) is None else float(getattr(tile, f)) for f in _FIELDS]


def _decode(tile) -> TileSpec:
    if isinstance(tile, TileSpec):
        return tile
    key = tuple(tile)
    spec = _decoded.get(key)
    if spec is None:
        v = dict(zip(_FIELDS, key, strict=True))
        kw = {f: (None if math.isnan(x) else x) for f, x in v.items()}
        kw["max_input_size"] = None if kw["max_input_size"] is None else int(kw["max_input_size"])
        for f in ("bound_per_channel", "out_noise_per_channel", "input_range"):
            kw[f] = bool(kw[f])
        spec = _decoded[key] = TileSpec(**kw, init_from_data=0)
    return spec


def _masks_shape(tile: TileSpec, x: Tensor, weight: Tensor) -> tuple:
    if tile.out_bound is None:
        return (0,)
    return (len(tile.sizes(weight.shape[1])), x.shape[0], weight.shape[0])


@torch.library.custom_op("fastnoise::tile_linear", mutates_args=())
def _tile_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], input_range: Optional[Tensor],
             wmax: Optional[Tensor], tile: list[float], sigma: Tensor, mode: int, noise_bias: bool, seed: int,
             offset: Tensor, weight_noise: bool, out_noise: bool) -> tuple[Tensor, Tensor]:
    return _tile_fwd(x, weight, bias, input_range, wmax, tile, sigma, mode, noise_bias, seed, offset,
                     weight_noise, out_noise)


@_tile_op.register_fake
def _(x, weight, bias, input_range, wmax, tile, sigma, mode, noise_bias, seed, offset, weight_noise,
      out_noise):
    return (x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(_masks_shape(_decode(tile), x, weight), dtype=torch.uint8))


@torch.library.custom_op("fastnoise::tile_linear_backward", mutates_args=())
def _tile_bwd_op(grad: Tensor, x: Tensor, weight: Tensor, input_range: Optional[Tensor], tile: list[float],
                 sigma: Tensor, mode: int, seed: int, offset: Tensor, masks: Tensor, weight_noise: bool,
                 need_x: bool, need_w: bool, need_b: bool,
                 need_r: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gx, dw, db, dr = _tile_bwd(grad, x, weight, input_range, tile, sigma, mode, seed, offset, masks,
                               weight_noise, need_x, need_w, need_b, need_r)
    return (_empty_like_none(gx, x), _empty_like_none(dw, weight), _empty_like_none(db, sigma),
            _empty_like_none(dr, sigma))


@_tile_bwd_op.register_fake
def _(grad, x, weight, input_range, tile, sigma, mode, seed, offset, masks, weight_noise, need_x, need_w,
      need_b, need_r):
    db = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            x.new_empty((weight.shape[0],) if need_b else (0,), dtype=db),
            sigma.new_empty(input_range.shape, dtype=input_range.dtype) if need_r else sigma.new_empty(0))


def _tile_setup(ctx, inputs, output):
    x, weight, bias, input_range, wmax, tile, sigma, mode, noise_bias, seed, offset, weight_noise, _ = inputs
    ctx.save_for_backward(x, weight, input_range, sigma, offset, output[1])
    ctx.args = (tile, mode, seed, weight_noise)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])


def _tile_backward(ctx, grad, _grad_masks, bwd=_tile_bwd_op):
    x, weight, input_range, sigma, offset, masks = ctx.saved_tensors
    tile, mode, seed, weight_noise = ctx.args
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    gx, dw, db, dr = bwd(grad.contiguous(), x, weight, input_range, tile, sigma, mode, seed, offset, masks,
                         weight_noise, need_x, need_w, bool(need_b), bool(need_r))
    return ((gx if need_x else None), (dw if need_w else None),
            (db.to(ctx.bias_dtype) if need_b else None), (dr if need_r else None)) + (None,) * 9


_tile_op.register_autograd(_tile_backward, setup_context=_tile_setup)


class _TileLinearFn(torch.autograd.Function):
    """Eager autograd of ``fastnoise::tile_linear`` without the ``torch.library`` wrapper (the
    route of plain tensors, as :func:`fastnoise.functional._call`)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _tile_fwd(*inputs)
        _tile_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad, grad_masks):
        # a backward that builds a graph calls the registered op (no derivative, and it says so)
        return _tile_backward(ctx, grad, grad_masks,
                              bwd=_tile_bwd_op if torch.is_grad_enabled() else _tile_bwd)


def _tile_call(args: tuple) -> Tensor:
    """The op's ``y``: through the registered op where compiled code, a mode or a subclass must
    see it, else through :class:`_TileLinearFn` (or the bare forward without gradients)."""
    from .functional import _PLAIN, _direct

    x, weight, bias, input_range = args[:4]
    if not _direct(x, weight, bias) or (input_range is not None and type(input_range) not in _PLAIN):
        return _tile_op(*args)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, input_range)):
        return _TileLinearFn.apply(*args)[0]
    return _tile_fwd(*args)[0]


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
    _check_linear(input, weight, bias, spec)
    t = len(tile.sizes(weight.shape[1]))
    if update is not None and input_range is not None:
        update_input_range_(input_range, update, input.detach(), tile)
    if tile.input_range:
        if not isinstance(input_range, Tensor) or input_range.shape != (t,):
            got = tuple(input_range.shape) if isinstance(input_range, Tensor) else input_range
            raise ValueError(f"input_range must be a tensor of shape ({t},) (one range per tile), "
                             f"got {got!r}")
        if not _tracing() and not bool((input_range.detach() > 0).all()):
            raise ValueError(f"input_range must be > 0, got {input_range.detach().tolist()}")
    rng.check_seed(seed)
    dtype = _compute_dtype(input, weight)
    x = input if input.dtype == dtype else input.to(dtype)
    weight_noise = spec is not None and spec.eta > 0
    wmax = sigma = None
    if weight_noise:
        mode, noise_bias = spec.mode, spec.noise_bias
        if (weight.device.type == "cpu" and not _tracing() and torch.is_grad_enabled()
                and weight.requires_grad and (tile.out_bound is not None or tile.out_noise > 0)):
            # a training call on the CPU: sigma from the tiles' max|W|, which the ADC bound and
            # the output noise need anyway (one reduction of W instead of two; its finiteness
            # check reads sigma on the host, which on CUDA would be a synchronisation)
            wmax = _wmax(weight, tile.sizes(weight.shape[1]), dtype, _kernels(x))
            sigma = _sigma_from_wmax(spec, wmax, bias)
        if sigma is None:
            sigma = _cached_sigma(spec, weight, bias)
    else:
        sigma, mode, noise_bias = weight.new_zeros(1, dtype=torch.float32), 0, False
    off = _offset_tensor(offset, weight.device)
    x2 = x.reshape(-1, x.shape[-1])
    y = _tile_call((x2, weight, bias, input_range if tile.input_range else None, wmax, _encode(tile), sigma,
                    mode, bool(noise_bias and bias is not None), seed, off, weight_noise, bool(out_noise)))
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
