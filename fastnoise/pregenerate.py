"""Generate the noisy weights of every layer of a model at once.

A ResNet-50 has 54 noisy layers; at batch 1-8 each layer's own ``W + sigma z`` launch costs more
than its conv. Inside ``with fastnoise.pregenerated(model):`` each forward of ``model`` first
writes every noisy layer's ``W + sigma z`` (and noisy bias) in one launch per (weight dtype,
noise mode) (:func:`fastnoise.kernels.noise_gen.noisy_weights_multi`), then each layer convolves
with its buffer. The buffers are those the layers would have drawn themselves: same seeds, same
offsets, call counters advanced the same way, so the outputs are those of the layers' own
``generate`` path (bit for bit) and match the other paths to rounding.

Under ``fastnoise.noise(draw=k)`` (robustness evaluation: one fixed noisy copy of the weights)
the buffers are kept for the whole block and reused by every forward until the draw, the spec
or the weights change, so a pass over a dataset generates the noise once::

    with torch.inference_mode(), fastnoise.pregenerated(model):
        for k in range(10):
            with fastnoise.noise(draw=k, eta=0.06):
                accuracy(model, loader)

Pregeneration is for forward-only passes: a layer whose weight needs a gradient (grad mode on,
``requires_grad``) takes its own path as usual (same noise, no buffer kept for backward).
Layers called twice in one forward use the buffer on their first call only (the second call has
a new offset). Without Triton on the weights' device the buffers come from the generator the
layers' own calls use (:func:`fastnoise._backends.noisy_weight`: the C++ kernels on the CPU when
built, else the pure-PyTorch reference), again equal to what the layers compute themselves.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import _backends, context, dispatch, functional, modules, rng
from .convert import noisy_layers

__all__ = ["pregenerated", "noisy_weights"]



@dataclass
class _Entry:
    key: tuple  # (spec, seed, draw or None, compute dtype)
    versions: tuple  # the weight's and bias's version counters when generated
    weight: Tensor
    bias: Optional[Tensor]
    one_shot: bool  # a call-counter offset: valid for the layer's next call only
    used: bool = False


# tests set it: the one Triton launch on CPU tensors too (through TRITON_INTERPRET=1)
TRITON_OFF_CUDA = False

# layer -> its pregenerated buffers; weak, so a dropped model takes its buffers along
_entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _grad_needed(layer: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    bias = layer.bias
    return layer.weight.requires_grad or (bias is not None and bias.requires_grad)


def _target_dtype(weight: Tensor) -> torch.dtype:
    """The compute dtype a call would use: autocast's when on, else the weight's."""
    dev = weight.device.type
    if weight.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _version(t: Optional[Tensor]):
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version: never equal to itself later
        return object()


def _versions(layer: nn.Module) -> tuple:
    """Version counters of the weight and bias: an in-place change invalidates a kept draw."""
    return (_version(layer.weight), _version(layer.bias))


def _peek(layer: nn.Module):
    """(spec, seed, offset) of the layer's next call without advancing its counter, or None
    (also on a chip, ``noise(hardware=...)``: each read draws its own noise)."""
    override = context.current()
    if override is not None and override.hardware is not None:
        return None
    return layer._noise_args(advance=False)


def _generate(jobs: list) -> list:
    """jobs: (layer, spec, seed, offset, dtype) -> [(noisy weight, bias for the call)]."""
    out: list = [None] * len(jobs)
    by_dtype: dict = {}
    for i, (layer, _spec, _seed, _offset, dtype) in enumerate(jobs):
        w = layer.weight
        # the Triton launch on CUDA only: on the CPU the layers' own auto path is the C++
        # generator (the interpreter, TRITON_INTERPRET=1, would be ~100x slower there)
        ok = ((w.device.type == "cuda" or TRITON_OFF_CUDA) and dispatch.triton_usable(w)[0]
              and dtype in dispatch.KERNEL_DTYPES and w.dtype in dispatch.KERNEL_DTYPES)
        by_dtype.setdefault((dtype, ok, w.device), []).append(i)
    for (dtype, use_kernel, _), idx in by_dtype.items():
        tensors, sigmas, modes, seeds, offsets, streams, slots = [], [], [], [], [], [], []
        for i in idx:
            layer, spec, seed, offset, _ = jobs[i]
            bias = layer.bias
            sigma = functional._cached_sigma(spec, layer.weight, bias)
            noise_bias = spec.noise_bias and bias is not None
            if not use_kernel:  # the layer's own generator: C++ on the CPU, else the reference
                wn = _backends.noisy_weight(layer.weight, sigma, spec.mode, seed, offset, dtype)
                bn = (_backends.noisy_bias(bias, sigma, spec.mode, seed, offset, dtype) if noise_bias
                      else bias)
                out[i] = (wn, bn)
                continue
            items = [(layer.weight.detach(), 0)] + ([(bias.detach(), 1)] if noise_bias else [])
            for t, stream in items:
                tensors.append(t)
                sigmas.append(sigma)
                modes.append(spec.mode)
                seeds.append(seed)
                offsets.append(offset)
                streams.append(stream)
                slots.append((i, stream))
        if not tensors:
            continue
        from .kernels import noise_gen

        buffers = noise_gen.noisy_weights_multi(tensors, sigmas, modes, seeds, offsets, dtype, streams)
        made: dict = {}
        for (i, stream), buf in zip(slots, buffers, strict=True):
            made.setdefault(i, [None, None])[stream] = buf
        for i, (wn, bn) in made.items():
            out[i] = (wn, bn if bn is not None else jobs[i][0].bias)
    return out


def _layers(model: nn.Module) -> list:
    """The drop-in layers (fused ops) of ``model``: the ones pregeneration serves."""
    return [(n, m) for n, m in noisy_layers(model) if isinstance(m, (modules.Linear, modules.Conv2d))]


def _offsets_snapshot(jobs: list) -> list:
    """Copy the call counters of the counter-offset jobs in one op, so the kernel reads the
    values of this moment whatever runs later on other streams."""
    idx = [i for i, j in enumerate(jobs) if isinstance(j[3], Tensor)]
    if not idx:
        return jobs
    snap = torch.stack([jobs[i][3].reshape(()) for i in idx])
    jobs = list(jobs)
    for n, i in enumerate(idx):
        layer, spec, seed, _, dtype = jobs[i]
        jobs[i] = (layer, spec, seed, snap[n], dtype)
    return jobs


@torch.no_grad()
def noisy_weights(model: nn.Module) -> dict:
    """``{name: (W + sigma z, bias)}`` for each noisy layer whose next call would be noisy.

    Exactly the buffers :func:`pregenerated` would hand the layers for their next call (in
    the current noise context, autocast state and train/eval mode); counters do not advance.
    The bias is the noisy bias when the spec asks for one, else the layer's bias.
    """
    names, jobs = [], []
    for name, layer in _layers(model):
        args = _peek(layer)
        if args is None:
            continue
        spec, seed, offset = args
        names.append(name)
        jobs.append((layer, spec, seed, offset, _target_dtype(layer.weight)))
    return dict(zip(names, _generate(_offsets_snapshot(jobs)), strict=True))


def _fingerprint(layers: list):
    """Everything a draw-mode entry depends on, or None when calls use counter offsets.

    Equal fingerprints on two forwards mean every layer would peek the same (spec, seed, draw,
    dtype) and see unchanged weights, so the entries made for the first still hold.
    """
    override = context.current()
    if override is None or not override.enabled or override.draw is None:
        return None
    dev = layers[0].weight.device.type if layers else "cpu"
    amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    return (override, torch.is_grad_enabled(), amp, rng.initial_seed(),
            tuple((m.noise_id, m.spec, m.training) + _versions(m) for m in layers))


def _prepare_forward(layers: list, last: dict) -> None:
    """Make an entry for every layer whose next call is noisy and has no valid entry yet.

    ``last`` keeps the fingerprint of the previous forward: in draw mode, an unchanged one skips
    the per-layer checks (their Python costs more than a small batch's GPU time).
    """
    fingerprint = _fingerprint(layers)
    if fingerprint is not None and fingerprint == last.get("fingerprint"):
        return
    last["fingerprint"] = fingerprint
    jobs, keys = [], []
    for layer in layers:
        args = _peek(layer)
        if args is None or _grad_needed(layer):
            _entries.pop(layer, None)
            continue
        spec, seed, offset = args
        dtype = _target_dtype(layer.weight)
        draw = offset if isinstance(offset, int) else None
        key = (spec, seed, draw, dtype)
        entry = _entries.get(layer)
        if (entry is not None and not entry.one_shot and entry.key == key
                and entry.versions == _versions(layer)):
            continue  # the same draw of unchanged weights: reuse
        jobs.append((layer, spec, seed, offset, dtype))
        keys.append(key)
    if not jobs:
        return
    for (layer, *_), key, (wn, bn) in zip(jobs, keys, _generate(_offsets_snapshot(jobs)), strict=True):
        _entries[layer] = _Entry(key, _versions(layer), wn, bn, one_shot=key[2] is None)


def _finish_forward(layers: list) -> None:
    for layer in layers:
        entry = _entries.get(layer)
        if entry is not None and entry.one_shot:
            del _entries[layer]


def _call_dtype(input: Tensor, weight: Tensor) -> torch.dtype:
    dev = input.device.type
    if input.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return input.dtype


def lookup(layer: nn.Module, spec, seed: int, offset, input: Tensor):
    """The layer's pregenerated ``(weight, bias)`` for this call, or None (then it runs as usual).

    Called by the layers' ``forward`` with the arguments of their call (the counter already
    advanced).
    """
    if not _entries:
        return None
    entry = _entries.get(layer)
    if entry is None or entry.used:
        return None
    draw = offset if isinstance(offset, int) else None
    if entry.key != (spec, seed, draw, _call_dtype(input, layer.weight)) or _grad_needed(layer):
        return None
    if entry.one_shot:
        entry.used = True
    elif entry.versions != _versions(layer):
        return None
    return entry.weight, entry.bias


@contextlib.contextmanager
def pregenerated(model: nn.Module):
    """Inside the block, each forward of ``model`` generates all its noisy weights in one launch.

    See the module docstring. The layers' results are unchanged; what changes is the number of
    launches (one per weight dtype and noise mode instead of one or two per layer) and, under
    ``fastnoise.noise(draw=k)``, that the buffers are reused across forwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pregenerated expects an nn.Module, got {type(model).__name__}")
    layers = [m for _, m in _layers(model)]
    last: dict = {}
    pre = model.register_forward_pre_hook(lambda module, args: _prepare_forward(layers, last))
    post = model.register_forward_hook(lambda module, args, output: _finish_forward(layers))
    try:
        yield model
    finally:
        pre.remove()
        post.remove()
        for layer in layers:
            _entries.pop(layer, None)


modules._pregenerated_lookup = lookup  # the layers ask here; this module imports them, not back
