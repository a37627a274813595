"""Drop-in noisy layers and model conversion.

``fastnoise.Linear`` / ``fastnoise.Conv2d`` subclass the torch modules and replace only
``forward``: constructor arguments, parameters, ``state_dict`` keys and ``repr`` (plus the spec)
are torch's. Noise is on in train mode and off in eval mode unless :func:`fastnoise.noise`
says otherwise. Each layer keeps an id and a call counter (a non-persistent buffer, so
``state_dict`` is unchanged); the per-call seed is derived from them and the global seed.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Iterable
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import context, functional, pregenerate, rng
from .functional import noisy_conv2d, noisy_linear
from .spec import NoiseSpec

__all__ = ["Linear", "Conv2d", "convert", "restore", "noise_state_dict", "load_noise_state_dict",
           "noisy_layers"]

_DRAW_TAG = 0xD7A3  # keeps evaluation draws apart from training's call counters


@functools.lru_cache(maxsize=4096)
def _seed(*values: int) -> int:
    """``rng.mix64`` of a layer's (global seed, id[, tag]), computed once per layer and seed."""
    return rng.mix64(*values)


class _NoisyMixin:
    """State and seed logic shared by the noisy layers."""

    spec: NoiseSpec
    noise_id: int
    noise_calls: torch.Tensor

    def _init_noise(self, spec: Optional[NoiseSpec], noise_id: Optional[int] = None) -> None:
        if spec is None:
            spec = NoiseSpec()
        if not isinstance(spec, NoiseSpec):
            raise TypeError(f"spec must be a fastnoise.NoiseSpec, got {type(spec).__name__}")
        self.spec = spec
        self.noise_id = rng.next_module_id() if noise_id is None else noise_id
        self.register_buffer("noise_calls", torch.zeros((), dtype=torch.int64,
                                                        device=self.weight.device), persistent=False)

    def _noise_args(self, advance: bool = True):
        """(spec, seed, offset) for this call, or None for a clean call. Advances the counter;
        ``advance=False`` only peeks (the offset is then the counter buffer itself)."""
        override = context.current()
        if override is None:
            if not self.training:
                return None
            spec = self.spec
        else:
            if not override.enabled:
                return None
            spec = override.apply(self.spec)
        if spec.eta == 0.0:
            return None
        compiling = torch.compiler.is_compiling()
        # memoized in eager; dynamo traces mix64 itself (it warns about lru_cache wrappers)
        mix = rng.mix64 if compiling else _seed
        if override is not None and override.draw is not None:
            seed = mix(rng.initial_seed(), self.noise_id, _DRAW_TAG)
            offset = override.draw
        else:
            seed = mix(rng.initial_seed(), self.noise_id)
            if not compiling and torch._C._current_graph_task_id() != -1:
                raise RuntimeError(
                    f"{type(self).__name__} (fastnoise) ran a noisy forward inside a backward pass, "
                    "as activation checkpointing's recomputation does: its call counter would move "
                    "on and the recomputed activations would see other noise than the forward, so "
                    "the gradients would be wrong. Keep fastnoise layers out of checkpointed "
                    "regions, or use fastnoise.noise(draw=k) to fix the noise for both passes.")
            if not advance:
                return spec, seed, self.noise_calls
            offset = self._advance_calls()
        return spec, seed, offset

    def _advance_calls(self) -> torch.Tensor:
        """This call's offset (the counter's value) and the counter moved on by one."""
        calls = self.noise_calls
        if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
            # a tensor made here would be an inference tensor, which a later training forward
            # could not save for backward: keep the buffer a normal tensor, update it in place
            offset = calls.clone()
            calls.add_(1)
            return offset
        # otherwise advance by a new tensor, not add_: the offset saved for backward is then never
        # written, which torch.compile needs (its partitioner may recompute a clone of a buffer
        # in the backward, after an in-place update; pytorch/pytorch PR 197039)
        if torch.compiler.is_compiling():
            self.noise_calls = calls + 1
        else:  # the same, without nn.Module.__setattr__'s checks (a few us per call)
            self._buffers["noise_calls"] = calls + 1
        return calls

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .float() swap the weights' data without a version bump, and a
        # round trip may land at the same address: kept sigmas must go
        out = super()._apply(fn, *args, **kwargs)
        functional.clear_sigma_cache()
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spec={self.spec}"


class Linear(_NoisyMixin, nn.Linear):
    """``torch.nn.Linear`` with Gaussian weight noise (see :class:`fastnoise.NoiseSpec`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, spec: Optional[NoiseSpec] = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_noise(spec)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        args = self._noise_args()
        if args is None:
            return F.linear(input, self.weight, self.bias)
        spec, seed, offset = args
        pre = pregenerate.lookup(self, spec, seed, offset, input)
        if pre is not None:  # inside fastnoise.pregenerated(...)
            return F.linear(input, *pre)
        return noisy_linear(input, self.weight, self.bias, spec, seed, offset)


class Conv2d(_NoisyMixin, nn.Conv2d):
    """``torch.nn.Conv2d`` with Gaussian weight noise (see :class:`fastnoise.NoiseSpec`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, spec: Optional[NoiseSpec] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        self._init_noise(spec)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        args = self._noise_args()
        if args is None:
            return self._conv_forward(input, self.weight, self.bias)
        spec, seed, offset = args
        pre = pregenerate.lookup(self, spec, seed, offset, input)
        if pre is not None:  # inside fastnoise.pregenerated(...)
            return self._conv_forward(input, *pre)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return noisy_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                            self.groups, spec, seed, offset)


_SWAPS = {nn.Linear: Linear, nn.Conv2d: Conv2d}
_UNSWAPS = {v: k for k, v in _SWAPS.items()}

Exclude = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _excluded(exclude: Exclude, name: str, module: nn.Module) -> bool:
    if exclude is None:
        return False
    if callable(exclude):
        return bool(exclude(name, module))
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def convert(model: nn.Module, spec: Optional[NoiseSpec] = None, exclude: Exclude = None) -> nn.Module:
    """Make every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` noisy, in place; returns ``model``.

    The layers keep their identity, parameters, hooks and ``state_dict`` keys (their class is
    swapped), so optimizers built before still hold the right parameters. Subclasses of the
    torch layers (which may not call ``forward``) are left alone.

    Args:
        spec: the noise of every converted layer (default ``NoiseSpec()``).
        exclude: module names to skip: a glob (``"fc"``, ``"layer4.*"``), a list of globs, or a
            callable ``(name, module) -> bool``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    spec = NoiseSpec() if spec is None else spec
    if not isinstance(spec, NoiseSpec):
        raise TypeError(f"spec must be a fastnoise.NoiseSpec, got {type(spec).__name__}")
    for name, module in model.named_modules():
        new_cls = _SWAPS.get(type(module))
        if new_cls is None or _excluded(exclude, name, module):
            continue
        module.__class__ = new_cls
        module._init_noise(spec)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` (and turn ``fastnoise.Linear``/``Conv2d`` into torch's), in place."""
    for module in model.modules():
        old_cls = _UNSWAPS.get(type(module))
        if old_cls is None:
            continue
        del module._buffers["noise_calls"]
        for attr in ("spec", "noise_id"):
            module.__dict__.pop(attr, None)
        module.__class__ = old_cls
    return model


def noisy_layers(model: nn.Module):
    """``(name, layer)`` for every noisy layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _NoisyMixin)]


def noise_state_dict(model: nn.Module) -> dict:
    """Ids and call counters of the noisy layers: with them a resumed run sees the same noise."""
    return {n: {"id": m.noise_id, "calls": int(m.noise_calls)} for n, m in noisy_layers(model)}


def load_noise_state_dict(model: nn.Module, state: dict) -> None:
    layers = dict(noisy_layers(model))
    if set(layers) != set(state):
        missing, extra = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
        raise ValueError(f"noise state does not match the model: missing {missing}, unexpected {extra}")
    for name, s in state.items():
        layers[name].noise_id = int(s["id"])
        layers[name].noise_calls.fill_(int(s["calls"]))
