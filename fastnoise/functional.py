"""Noisy linear and conv2d as differentiable functions.

``noisy_linear(x, W, b, spec, seed, offset)`` computes ``x @ (W + sigma z)^T + b`` where ``z`` is
the contract's noise for ``(seed, offset)`` (:mod:`fastnoise.rng`). Backward regenerates ``z``
from the saved seed; gradients w.r.t. ``W`` and ``b`` are straight-through (sigma constant).
Nothing of the weight's size is saved: only ``x``, the weight parameter itself, sigma and the
offset.

The ops are registered with ``torch.library`` (``torch.ops.fastnoise.*``) so
``torch.compile(fullgraph=True)`` sees them as single nodes.

Per-call overhead (eager only; compiled code and CUDA-graph capture compute everything in
the graph): a call that needs no gradient of the weight (evaluation) reuses the sigma of the
weight's previous such call while the weight, the bias and the spec are unchanged (version
counter, data pointer, dtype, device, shape, strides) and no optimizer has stepped since, so a
frozen model evaluated over many draws reduces each weight once, not once per call. Training
calls compute sigma afresh. An int offset (a draw) becomes a device tensor once, not one
host-to-device copy per call. Weights written through ``.data`` (or by collectives) outside an
optimizer step bump no version counter: call :func:`clear_sigma_cache` after such a write.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _backends, dispatch
from ._backends_base import conv_out_hw, conv_output_memory_format, grad_memory_format
from .rng import check_seed
from .spec import NoiseSpec

__all__ = ["noisy_linear", "noisy_conv2d", "clear_sigma_cache"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- input checks
def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_common(x: Tensor, weight: Tensor, bias: Optional[Tensor], spec) -> None:
    _check_tensor("input", x)
    _check_tensor("weight", weight)
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"input is on {x.device} but {name} is on {t.device}")
    if spec is not None and not isinstance(spec, NoiseSpec):
        raise TypeError(f"spec must be a fastnoise.NoiseSpec or None, got {type(spec).__name__}")


def _check_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], spec) -> None:
    """:func:`_check_common` and a linear's shapes: ``weight [out, in]``, ``input [..., in]``."""
    _check_common(input, weight, bias, spec)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension must be in_features={weight.shape[1]}, "
                         f"got input shape {tuple(input.shape)}")


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's if it is on, else the input's (which must match W's)."""
    dev = x.device.type
    # meta: autocast knows no such device (a meta forward counts shapes and FLOPs)
    if dev != "meta" and torch.is_autocast_enabled(dev) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    if x.dtype != weight.dtype:
        raise TypeError(f"input dtype {x.dtype} does not match weight dtype {weight.dtype} "
                        "(cast one of them, or run under torch.autocast)")
    return x.dtype


# ----------------------------------------------------------------------------- per-call caches
_PLAIN = (Tensor, torch.nn.Parameter)
# id(weight) -> (weakref to the weight, key, weakref to the bias or None, sigma); one slot per
# weight tensor, removed when the weight is freed; sigma is [1] or [out], never weight-sized
_sigma_slots: dict = {}
# bumped by every optimizer step: fused optimizers (fused=True) write the weights without
# bumping their version counters, so a kept sigma is never trusted across a step
_sigma_generation = 0
# (offset, device) -> int64 scalar tensor; emptied when full
_offset_slots: dict = {}
_MAX_OFFSETS = 256


def clear_sigma_cache() -> None:
    """Forget every kept sigma. Needed only after writing weights through ``.data`` or by
    collectives outside an optimizer step; ``Module.to`` / ``.cuda()`` / ``.float()`` on a model
    with fastnoise layers call it (a dtype round trip may reuse the same address)."""
    _sigma_slots.clear()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _sigma_generation
    _sigma_generation += 1


_step_hook = register_optimizer_step_post_hook(_after_optimizer_step)


_tracing = dispatch.tracing


def _eager(device: torch.device) -> bool:
    """Not tracing (see :func:`_tracing`) nor capturing a CUDA graph (a graph must compute its
    own values)."""
    return not (_tracing()
                or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()))


def _drop_sigma(ref: weakref.ref, wid: int, slots: dict = _sigma_slots) -> None:
    slot = slots.get(wid)
    if slot is not None and slot[0] is ref:
        del slots[wid]


def _cached_sigma(spec: NoiseSpec, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``spec.sigma(weight, bias)``, kept while the weight, the bias and the spec are unchanged.

    Kept only for calls that need no gradient of what sigma reads (evaluation): a training
    call computes it afresh, whatever wrote the weights (``.data``, collectives, fused steps).
    """
    b = bias if spec.noise_bias else None  # without noise_bias sigma does not read the bias
    if (not _eager(weight.device) or type(weight) not in _PLAIN
            or (b is not None and type(b) not in _PLAIN)):
        return spec.sigma(weight, bias)
    wid = id(weight)
    if torch.is_grad_enabled() and (weight.requires_grad or (b is not None and b.requires_grad)):
        _sigma_slots.pop(wid, None)  # written by training: an evaluation call recomputes too
        return spec.sigma(weight, bias)
    try:
        key = (spec, _sigma_generation, weight._version, weight.data_ptr(), weight.dtype,
               weight.device, weight.shape, weight.stride(),
               None if b is None else (b._version, b.data_ptr(), b.dtype, b.shape))
    except RuntimeError:  # an inference tensor (no version counter) or one without storage
        return spec.sigma(weight, bias)
    slot = _sigma_slots.get(wid)
    if (slot is not None and slot[0]() is weight and slot[1] == key
            and (slot[2] is None if b is None else slot[2]() is b)):
        return slot[3]
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):  # a normal tensor: a later training call can save it
            sigma = spec.sigma(weight, bias)
    else:
        sigma = spec.sigma(weight, bias)
    ref = slot[0] if slot is not None and slot[0]() is weight else weakref.ref(
        weight, lambda r, wid=wid, drop=_drop_sigma: drop(r, wid))
    _sigma_slots[wid] = (ref, key, None if b is None else weakref.ref(b), sigma)
    return sigma


def _offset_tensor(offset, device) -> Tensor:
    if isinstance(offset, Tensor):
        if offset.numel() != 1 or offset.dtype != torch.int64:
            raise TypeError(f"offset tensor must hold one int64, got {offset.dtype} {tuple(offset.shape)}")
        return offset if offset.dim() == 0 else offset.reshape(())
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0 or an int64 tensor, got {offset!r}")
    offset &= 0xFFFFFFFF
    if not _eager(device):
        return torch.tensor(offset, dtype=torch.int64, device=device)
    t = _offset_slots.get((offset, device))
    if t is None:  # one host-to-device copy per (offset, device), not one per call
        if len(_offset_slots) >= _MAX_OFFSETS:
            _offset_slots.clear()
        with torch.inference_mode(False):  # a normal tensor: a training call can save it
            t = torch.tensor(offset, dtype=torch.int64, device=device)
        _offset_slots[(offset, device)] = t
    return t


def _prepare(x, weight, bias, spec, seed, offset, path, backward_path):
    dispatch.check_path(path)
    dispatch.check_path(backward_path or path)
    check_seed(seed)
    dtype = _compute_dtype(x, weight)
    sigma = _cached_sigma(spec, weight, bias)
    x = x if x.dtype == dtype else x.to(dtype)  # no dispatch for a no-op cast
    return (x, sigma, spec.mode, bool(spec.noise_bias and bias is not None),
            _offset_tensor(offset, weight.device), backward_path or path)


def _empty_like_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


# ----------------------------------------------------------------------------- calling the ops
def _direct(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Call the implementation without the ``torch.library`` wrapper: eager, plain tensors, no
    torch function / dispatch mode, no ``torch.func`` transform, no forward-mode AD level and no
    tracing active. The wrapper's Python dispatch costs ~15 us per call without autograd and
    ~50 us with it (CPU, torch 2.14), more than a small layer's kernel; compiled code, tracing,
    ``FakeTensor`` and other modes, ``torch.func`` and tensor subclasses still see the
    registered ops."""
    return (not _tracing()  # first: dynamo must not trace the C queries below
            and type(x) in _PLAIN and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN)
            and not x.is_meta  # meta tensors: the registered op's fake gives the shapes
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()  # none, or disabled
            and torch._C._functorch.peek_interpreter_stack() is None
            and torch.autograd.forward_ad._current_level < 0)  # no dual tensors


def _eager_function(name, fwd, setup, backward, bwd, bwd_op) -> type[torch.autograd.Function]:
    """An op's autograd (its ``setup_context`` and backward) as an ``autograd.Function`` that
    calls the implementation functions, not the registered ops: the eager route of :func:`_call`.
    A backward that builds a graph (``create_graph=True``) calls the registered backward op,
    which has no derivative and says so, as the op route does (the implementation would detach
    the weight and return a wrong second derivative)."""

    def forward(ctx, *inputs):
        out = fwd(*inputs)
        setup(ctx, inputs, out)
        return out

    def backward_(ctx, grad):
        return backward(ctx, grad, bwd=bwd_op if torch.is_grad_enabled() else bwd)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward_),
                 "__doc__": f"{name}: eager autograd of the op without the torch.library wrapper."})


def _call(op, fn: type[torch.autograd.Function], impl, args: tuple) -> Tensor:
    """``op(*args)`` (the custom op), or the same computation through ``fn`` / ``impl``."""
    x, weight, bias = args[:3]
    if not _direct(x, weight, bias):
        return op(*args)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return fn.apply(*args)
    return impl(*args)


# ----------------------------------------------------------------------------- linear
def _linear_impl(path: str, x: Tensor, weight: Tensor, backward: bool = False):
    return _backends.linear_impl(path, x, weight, backward)


def _linear_fwd(x, weight, bias, sigma, mode, noise_bias, seed, offset, path, backward_path):
    impl = _linear_impl(path, x, weight)
    return impl.forward(x, weight, bias, sigma, mode, noise_bias, seed, offset)


@torch.library.custom_op("fastnoise::noisy_linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], sigma: Tensor, mode: int,
               noise_bias: bool, seed: int, offset: Tensor, path: str, backward_path: str) -> Tensor:
    return _linear_fwd(x, weight, bias, sigma, mode, noise_bias, seed, offset, path, backward_path)


@_linear_op.register_fake
def _(x, weight, bias, sigma, mode, noise_bias, seed, offset, path, backward_path):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_bwd(grad, x, weight, sigma, mode, seed, offset, path, need_x, need_w, need_b):
    impl = _linear_impl(path, grad, weight, backward=True)
    dx, dw, db = impl.backward(grad, x, weight, sigma, mode, seed, offset, need_x, need_w, need_b)
    return _empty_like_none(dx, x), _empty_like_none(dw, weight), _empty_like_none(db, sigma)


@torch.library.custom_op("fastnoise::noisy_linear_backward", mutates_args=())
def _linear_bwd_op(grad: Tensor, x: Tensor, weight: Tensor, sigma: Tensor, mode: int, seed: int,
                   offset: Tensor, path: str, need_x: bool, need_w: bool,
                   need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _linear_bwd(grad, x, weight, sigma, mode, seed, offset, path, need_x, need_w, need_b)


@_linear_bwd_op.register_fake
def _(grad, x, weight, sigma, mode, seed, offset, path, need_x, need_w, need_b):
    return (x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,)),
            sigma.new_empty((weight.shape[0],) if need_b else (0,)))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, sigma, mode, noise_bias, seed, offset, path, backward_path = inputs
    ctx.save_for_backward(x, weight, sigma, offset)
    ctx.args = (mode, seed, backward_path)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad, bwd=_linear_bwd_op):
    x, weight, sigma, offset = ctx.saved_tensors
    mode, seed, path = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = bwd(grad.contiguous(), x, weight, sigma, mode, seed, offset, path,
                     need_x, need_w, bool(need_b))
    return (dx if need_x else None, dw if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None) + (None,) * 7


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


_LinearFn = _eager_function("_LinearFn", _linear_fwd, _linear_setup, _linear_backward, _linear_bwd,
                            _linear_bwd_op)


def noisy_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                 spec: Optional[NoiseSpec] = NoiseSpec(), seed: int = 0, offset=0, *,
                 path: str = "auto", backward_path: Optional[str] = None) -> Tensor:
    """``F.linear`` with Gaussian weight noise ``W + sigma z`` drawn from ``(seed, offset)``.

    Args:
        input: ``[..., in_features]``.
        weight: ``[out_features, in_features]``; under ``torch.autocast`` it may stay float32
            (it is rounded to the compute dtype inside the kernel, not copied).
        bias: ``[out_features]`` or None.
        spec: the noise size; None or ``eta == 0`` gives exactly ``F.linear``.
        seed: Philox key, an int in ``[0, 2**63)``.
        offset: call counter (int, or an int64 tensor read on the device without a sync).
        path: ``"auto"``, ``"reference"``, ``"fused"`` or ``"generate"`` (see
            :mod:`fastnoise.dispatch`); ``backward_path`` overrides it for the backward.
    """
    _check_linear(input, weight, bias, spec)
    if spec is None or spec.eta == 0.0 or weight.numel() == 0:  # no weight, no noise (sigma 0)
        return F.linear(input, weight, bias)
    x, sigma, mode, noise_bias, off, bpath = _prepare(input, weight, bias, spec, seed, offset,
                                                      path, backward_path)
    return _call(_linear_op, _LinearFn, _linear_fwd,
                 (x, weight, bias, sigma, mode, noise_bias, seed, off, path, bpath))


# ----------------------------------------------------------------------------- conv2d
def _conv_impl(path: str, x: Tensor, weight: Tensor, geometry, backward: bool = False):
    return _backends.conv2d_impl(path, x, weight, geometry, backward)


def _conv_fwd(x, weight, bias, sigma, mode, noise_bias, seed, offset, stride, padding, dilation,
              groups, path, backward_path):
    geometry = (stride, padding, dilation, groups)
    impl = _conv_impl(path, x, weight, geometry)
    y = impl.forward(x, weight, bias, sigma, mode, noise_bias, seed, offset, *geometry)
    return y.contiguous(memory_format=conv_output_memory_format(x, weight))  # the fake's layout


@torch.library.custom_op("fastnoise::noisy_conv2d", mutates_args=())
def _conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], sigma: Tensor, mode: int,
             noise_bias: bool, seed: int, offset: Tensor, stride: list[int], padding: list[int],
             dilation: list[int], groups: int, path: str, backward_path: str) -> Tensor:
    return _conv_fwd(x, weight, bias, sigma, mode, noise_bias, seed, offset, stride, padding,
                     dilation, groups, path, backward_path)


@_conv_op.register_fake
def _(x, weight, bias, sigma, mode, noise_bias, seed, offset, stride, padding, dilation, groups,
      path, backward_path):
    oh, ow = conv_out_hw(x.shape[-2], x.shape[-1], weight, stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=conv_output_memory_format(x, weight))


def _conv_bwd(grad, x, weight, sigma, mode, seed, offset, stride, padding, dilation, groups, path,
              need_x, need_w, need_b):
    geometry = (stride, padding, dilation, groups)
    impl = _conv_impl(path, grad, weight, geometry, backward=True)
    dx, dw, db = impl.backward(grad, x, weight, sigma, mode, seed, offset, *geometry,
                               need_x, need_w, need_b)
    # the fake's layouts: each gradient in its input's
    dx = None if dx is None else dx.contiguous(memory_format=grad_memory_format(x))
    dw = None if dw is None else dw.contiguous(memory_format=grad_memory_format(weight))
    return _empty_like_none(dx, x), _empty_like_none(dw, weight), _empty_like_none(db, sigma)


@torch.library.custom_op("fastnoise::noisy_conv2d_backward", mutates_args=())
def _conv_bwd_op(grad: Tensor, x: Tensor, weight: Tensor, sigma: Tensor, mode: int, seed: int,
                 offset: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                 groups: int, path: str, need_x: bool, need_w: bool,
                 need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _conv_bwd(grad, x, weight, sigma, mode, seed, offset, stride, padding, dilation, groups,
                     path, need_x, need_w, need_b)


@_conv_bwd_op.register_fake
def _(grad, x, weight, sigma, mode, seed, offset, stride, padding, dilation, groups, path,
      need_x, need_w, need_b):
    def like(t, need):
        if not need:
            return t.new_empty((0,))
        return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=grad_memory_format(t))

    return like(x, need_x), like(weight, need_w), grad.new_empty((weight.shape[0],) if need_b else (0,))


def _conv_setup(ctx, inputs, output):
    (x, weight, bias, sigma, mode, noise_bias, seed, offset, stride, padding, dilation, groups,
     path, backward_path) = inputs
    ctx.save_for_backward(x, weight, sigma, offset)
    ctx.args = (mode, seed, stride, padding, dilation, groups, backward_path)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _conv_backward(ctx, grad, bwd=_conv_bwd_op):
    x, weight, sigma, offset = ctx.saved_tensors
    mode, seed, stride, padding, dilation, groups, path = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = bwd(grad, x, weight, sigma, mode, seed, offset, stride, padding,
                     dilation, groups, path, need_x, need_w, bool(need_b))
    return (dx if need_x else None, dw if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None) + (None,) * 11


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup)


_ConvFn = _eager_function("_ConvFn", _conv_fwd, _conv_setup, _conv_backward, _conv_bwd, _conv_bwd_op)


def _pair(v, name: str) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in (a, b)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return [a, b]


def _resolve_padding(x: Tensor, weight: Tensor, padding, dilation, stride):
    """String padding -> explicit ints; 'same' with an even kernel pads the input asymmetrically."""
    if not isinstance(padding, str):
        pad = _pair(padding, "padding")
        if min(pad) < 0:
            raise ValueError(f"padding must be >= 0, got {padding!r}")
        return x, pad
    if padding == "valid":
        return x, [0, 0]
    if padding != "same":
        raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
    if stride != [1, 1]:
        raise ValueError("padding='same' is not supported for strided convolutions")
    pad, extra = [], []
    for d, k in zip(dilation, weight.shape[2:], strict=True):
        total = d * (k - 1)
        pad.append(total // 2)
        extra.append(total - 2 * (total // 2))
    if any(extra):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return x, pad


def noisy_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                 dilation=1, groups: int = 1, spec: Optional[NoiseSpec] = NoiseSpec(), seed: int = 0,
                 offset=0, *, path: str = "auto", backward_path: Optional[str] = None) -> Tensor:
    """``F.conv2d`` with Gaussian weight noise; arguments as :func:`noisy_linear` and ``F.conv2d``.

    The noise of weight ``[out, in/groups, kh, kw]`` is that of its GEMM view
    ``[out, in/groups * kh * kw]``.
    """
    _check_common(input, weight, bias, spec)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [out, in/groups, kh, kw], got shape {tuple(weight.shape)}")
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 3-D or 4-D [N, C, H, W], got shape {tuple(input.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"stride and dilation must be >= 1, got {stride} and {dilation}")
    c_in = input.shape[-3]
    if c_in != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"input has {c_in} channels but weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")
    if spec is None or spec.eta == 0.0 or weight.numel() == 0:  # no weight, no noise (sigma 0)
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    x, pad = _resolve_padding(x, weight, padding, dilation, stride)
    oh, ow = conv_out_hw(x.shape[-2], x.shape[-1], weight, stride, pad, dilation)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {tuple(input.shape)} is too small for kernel {tuple(weight.shape[2:])} "
                         f"with padding {pad}, dilation {dilation}")
    x, sigma, mode, noise_bias, off, bpath = _prepare(x, weight, bias, spec, seed, offset, path,
                                                      backward_path)
    y = _call(_conv_op, _ConvFn, _conv_fwd, (x, weight, bias, sigma, mode, noise_bias, seed, off,
                                            stride, pad, dilation, groups, path, bpath))
    return y.squeeze(0) if unbatched else y


# ----------------------------------------------------------------------------- any weight
def _weight_fwd(weight: Tensor, sigma: Tensor, mode: int, seed: int, offset: Tensor, is_bias: bool) -> Tensor:
    make = _backends.noisy_bias if is_bias else _backends.noisy_weight
    # contiguous, as the fake says, whatever the strides of the weight (a transposed view)
    return make(weight, sigma, mode, seed, offset, weight.dtype).contiguous()


@torch.library.custom_op("fastnoise::noisy_weight", mutates_args=())
def _weight_op(weight: Tensor, sigma: Tensor, mode: int, seed: int, offset: Tensor, is_bias: bool) -> Tensor:
    return _weight_fwd(weight, sigma, mode, seed, offset, is_bias)


@_weight_op.register_fake
def _(weight, sigma, mode, seed, offset, is_bias):
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def _weight_setup(ctx, inputs, output):
    pass


def _weight_backward(ctx, grad):
    return (grad,) + (None,) * 5  # straight-through: d(W + sigma z)/dW = 1, sigma constant


_weight_op.register_autograd(_weight_backward, setup_context=_weight_setup)


class _WeightFn(torch.autograd.Function):
    """Eager autograd of ``fastnoise::noisy_weight`` without the ``torch.library`` wrapper."""

    @staticmethod
    def forward(ctx, weight, sigma, mode, seed, offset, is_bias):
        return _weight_fwd(weight, sigma, mode, seed, offset, is_bias)

    @staticmethod
    def backward(ctx, grad):
        return _weight_backward(ctx, grad)


def _noisy_tensor(t: Tensor, sigma: Tensor, mode: int, seed: int, off: Tensor, is_bias: bool) -> Tensor:
    args = (t, sigma, mode, seed, off, is_bias)
    if not _direct(t, t, None):
        return _weight_op(*args)
    if torch.is_grad_enabled() and t.requires_grad:
        return _WeightFn.apply(*args)
    return _weight_fwd(*args)


def noisy_weight(weight: Tensor, bias: Optional[Tensor] = None, spec: Optional[NoiseSpec] = NoiseSpec(),
                 seed: int = 0, offset=0) -> tuple[Tensor, Optional[Tensor]]:
    """``(W + sigma z, b')`` for a weight of any shape (its GEMM view ``[shape[0], -1]``), with a
    straight-through gradient: the path of every use of a weight that has no fused op (RNNs,
    attention projections, Conv1d/3d, transposed convs, ``x @ W`` in user code).

    ``b'`` is ``b + sigma z_b`` when ``spec.noise_bias``, else ``bias`` itself (None stays None).
    The noise is the contract's for ``(seed, offset)``, the same as :func:`noisy_linear` draws for
    a 2-D weight. Unlike the fused ops, the noisy weight is a real tensor: the op that consumes it
    keeps it for its own backward if it needs to.
    """
    _check_tensor("weight", weight)
    if weight.dim() < 1:
        raise ValueError(f"weight must have at least 1 dimension, got shape {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if spec is not None and not isinstance(spec, NoiseSpec):
        raise TypeError(f"spec must be a fastnoise.NoiseSpec or None, got {type(spec).__name__}")
    if spec is None or spec.eta == 0.0 or weight.numel() == 0:  # no weight, no noise (sigma 0)
        return weight, bias
    check_seed(seed)
    sigma = _cached_sigma(spec, weight, bias)
    off = _offset_tensor(offset, weight.device)
    wn = _noisy_tensor(weight, sigma, spec.mode, seed, off, False)
    if bias is not None and spec.noise_bias:
        bias = _noisy_tensor(bias, sigma, spec.mode, seed, off, True)
    return wn, bias
