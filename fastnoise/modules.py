"""Drop-in noisy layers and the noise state every noisy module carries.

``fastnoise.Linear`` / ``fastnoise.Conv2d`` subclass the torch modules and replace only
``forward``: constructor arguments, parameters, ``state_dict`` keys and ``repr`` (plus the spec)
are torch's. Noise is on in train mode and off in eval mode unless :func:`fastnoise.noise`
says otherwise. Their forward calls the fused ops of :mod:`fastnoise.functional`.

Every module that holds noisy weights (these two layers, and the modules that
:func:`fastnoise.convert` makes noisy through :mod:`fastnoise.intercept`) carries, in
:class:`NoisyMixin`:

- ``spec``: its :class:`~fastnoise.NoiseSpec`;
- ``noise_key`` / ``noise_id``: its identity. :func:`fastnoise.convert` sets the key to the
  module's qualified name in the converted model and the id to a hash of it
  (:func:`fastnoise.rng.key_id`), so distinct layers draw independent noise, a saved and
  reloaded model (or a fresh one of the same architecture) draws the same noise, and the noise
  does not depend on what else the process built. A deep copy gets an id of its own (the
  original's id mixed with a copy number), so the copies that ``nn.TransformerEncoder`` makes of
  its layer differ; ``convert`` on the enclosing model names them by their places again. A layer
  built directly, outside ``convert``, gets a process-wide number until then;
- one call counter per noisy weight (a non-persistent buffer, so ``state_dict`` is unchanged),
  advanced by every noisy use and restarted by :func:`fastnoise.manual_seed`.

The per-use seed is ``mix(global seed, id[, weight name])`` and the offset the counter; under
``fastnoise.noise(draw=k)`` it is ``mix(seed, id[, name], tag)`` and the offset ``k``.
"""

from __future__ import annotations

import copy
import functools
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import context, functional, rng
from ._hardware_ops import hardware_weight
from .functional import noisy_conv2d, noisy_linear
from .spec import NoiseSpec
from .tile import TileSpec
from .tile_ops import tile_conv2d, tile_linear

__all__ = ["Linear", "Conv2d", "NoisyMixin", "counter_name", "weight_ids"]

_DRAW_TAG = 0xD7A3  # keeps evaluation draws apart from training's call counters
_counter_lock = threading.Lock()  # held while a call counter is read and moved on

# set by fastnoise.pregenerate when imported: (layer, spec, seed, offset, input) -> (W, b) or None
_pregenerated_lookup = None


@functools.lru_cache(maxsize=4096)
def _seed(*values: int) -> int:
    """``rng.mix64`` of a weight's (global seed, id[, name id][, tag]), computed once."""
    return rng.mix64(*values)


def weight_ids(noise_id: int, weights) -> dict:
    """``{weight name: the ints its seed mixes}``: the module's id, and the name for weights other
    than ``weight`` (kept per module, so a traced forward reads constants)."""
    return {w: (noise_id,) if w == "weight" else (noise_id, rng.key_id(w)) for w in weights}


def counter_name(weight: str) -> str:
    """The buffer that counts a weight's noisy uses: ``noise_calls`` for ``weight``."""
    return "noise_calls" if weight == "weight" else f"noise_calls_{weight.replace('.', '_')}"


class NoisyMixin:
    """Spec, identity and call counters of the noisy weights a module holds (see the module
    docstring). ``noise_weights`` names them (``("weight",)`` for the drop-in layers)."""

    spec: NoiseSpec
    tile: Optional[TileSpec] = None  # the crossbar tile (drop-in layers only), see set_tile
    noise_id: int
    noise_key: Optional[str]
    noise_weights: tuple

    def _init_noise(self, spec: Optional[NoiseSpec], weights=("weight",), key: Optional[str] = None) -> None:
        if spec is None:
            spec = NoiseSpec()
        if not isinstance(spec, NoiseSpec):
            raise TypeError(f"spec must be a fastnoise.NoiseSpec, got {type(spec).__name__}")
        self.spec = spec
        self.noise_weights = tuple(weights)
        self.noise_copies = 0
        self._bind(key)
        self._noise_epoch = rng.noise_epoch()
        for name in self.noise_weights:
            t = self._parameters.get(name)
            device = t.device if t is not None else None
            self.register_buffer(counter_name(name), torch.zeros((), dtype=torch.int64, device=device),
                                 persistent=False)

    def _bind(self, key: Optional[str]) -> None:
        """Name this module's noise: ``key`` (its qualified name), or a process-wide number."""
        self.noise_key = key
        self._set_id(rng.next_module_id() if key is None else rng.key_id(key))

    def _set_id(self, noise_id: int) -> None:
        self.noise_id = noise_id
        self._noise_wids = weight_ids(noise_id, self.noise_weights)

    def set_tile(self, tile: Optional[TileSpec]) -> None:
        """Put the layer on the crossbar tile ``tile`` (None: off the tile). With input ranges it
        gets the parameter ``input_range`` (one range per tile, ``tile.input_range_init``) and the
        buffer ``input_range_update_idx`` (batches seen by the initialisation from data), both in
        ``state_dict``: build the optimizer after this call. A layer already on a tile with as many
        tiles keeps its ranges (and their count of batches seen): another tile spec (say, without
        output noise) does not forget what was learned."""
        old_r = self._parameters.pop("input_range", None)
        old_n = self._buffers.pop("input_range_update_idx", None)
        self.__dict__.pop("tile", None)
        if tile is None:
            return
        if not isinstance(tile, TileSpec):
            raise TypeError(f"tile must be a fastnoise.TileSpec or None, got {type(tile).__name__}")
        if getattr(self, "groups", 1) != 1:
            raise ValueError(f"the crossbar tile supports conv2d with groups=1 only, "
                             f"got groups={self.groups}")
        self.__dict__["tile"] = tile
        if tile.input_range:
            w = self.weight
            t = len(tile.sizes(w[0].numel()))
            p = torch.full((t,), tile.input_range_init, dtype=w.dtype, device=w.device)
            n = torch.zeros(t, dtype=torch.int64, device=w.device)
            if old_r is not None and old_r.shape == (t,):
                p, n = old_r.detach().clone(), old_n
            self.input_range = nn.Parameter(p, requires_grad=tile.learn_input_range)
            self.register_buffer("input_range_update_idx", n)

    def _drop_noise(self) -> None:
        self.set_tile(None)
        for name in self.noise_weights:
            self._buffers.pop(counter_name(name), None)
        for attr in ("spec", "noise_id", "noise_key", "noise_weights", "noise_copies", "_noise_epoch",
                     "_noise_wids"):
            self.__dict__.pop(attr, None)

    def _restart_counters(self) -> None:
        """A :func:`fastnoise.manual_seed` ran since the counters last moved: back to 0."""
        self._noise_epoch = rng.noise_epoch()
        for name in self.noise_weights:
            c = counter_name(name)
            old = self._buffers[c]
            self._buffers[c] = torch.zeros((), dtype=torch.int64, device=old.device)

    def _noise_args(self, advance: bool = True, name: str = "weight", chip: bool = False):
        """(spec, seed, offset) for this use of weight ``name``, or None for a clean use. Advances
        its counter; ``advance=False`` only peeks (the offset is then the counter buffer itself).
        ``chip``: the layer is on a crossbar tile, which stays on when ``eta`` is 0 (the spec
        returned then has ``eta == 0``: the tile without weight noise)."""
        override = context.current()
        if override is None:
            if not self.training:
                return None
            spec = self.spec
        else:
            if not override.enabled:
                return None
            spec = override.apply(self.spec)
        if override is not None and override.hardware is not None:
            return self._hardware_args(override, name)
        if spec.eta == 0.0 and not chip:
            return None
        compiling = torch.compiler.is_compiling()
        # memoized in eager; dynamo traces mix64 itself (it warns about lru_cache wrappers)
        mix = rng.mix64 if compiling else _seed
        if override is not None and override.has_draw:
            base = rng.initial_seed() if override.seed is None else override.seed
            # evaluate_robustness(seed=...) names the chips by the layers' places in its model
            wids = self.__dict__.get("_draw_wids") or self._noise_wids
            # compiled: the draw as a tensor input, so another chip reuses the graph
            draw = override.draw_tensor if compiling else override.draw
            return spec, mix(base, *wids[name], _DRAW_TAG), draw
        seed = mix(rng.initial_seed(), *self._noise_wids[name])
        if not compiling and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                f"{type(self).__name__} (fastnoise) ran a noisy forward inside a backward pass, "
                "as activation checkpointing's recomputation does: its call counter would move "
                "on and the recomputed activations would see other noise than the forward, so "
                "the gradients would be wrong. Keep fastnoise layers out of checkpointed "
                "regions, or use fastnoise.noise(draw=k) to fix the noise for both passes.")
        cname = counter_name(name)
        if compiling:  # one graph, traced once: dynamo cannot trace a lock (nor needs one)
            if self._noise_epoch != rng.noise_epoch():
                self._restart_counters()
            return spec, seed, self._buffers[cname] if not advance else self._advance_calls(cname)
        # two threads training one layer: the read and the move of the counter are one step, so
        # every forward gets a counter value of its own (torch ops release the GIL in between)
        with _counter_lock:
            if self._noise_epoch != rng.noise_epoch():
                self._restart_counters()
            if not advance:
                return spec, seed, self._buffers[cname]
            return spec, seed, self._advance_calls(cname)

    def _hardware_args(self, override, name: str):
        """(HardwareRead, chip key, chip) for this use of weight ``name`` on the block's chip:
        the key is the one a Gaussian ``draw=k`` uses, the read the next of this weight's."""
        from .hardware.base import HardwareRead

        base = rng.initial_seed() if override.seed is None else override.seed
        wids = self.__dict__.get("_draw_wids") or self._noise_wids
        read = override.next_read((id(self), name))
        key = _seed(base, *wids[name], _DRAW_TAG)
        return HardwareRead(override.hardware, override.t, override.draw, read), key, override.draw

    def _advance_calls(self, cname: str = "noise_calls") -> torch.Tensor:
        """This use's offset (the counter's value) and the counter moved on by one (in eager mode,
        under ``_counter_lock``)."""
        calls = self._buffers[cname]
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
            setattr(self, cname, calls + 1)
        else:  # the same, without nn.Module.__setattr__'s checks (a few us per call)
            self._buffers[cname] = calls + 1
        return calls

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .float() swap the weights' data without a version bump, and a
        # round trip may land at the same address: kept sigmas must go
        out = super()._apply(fn, *args, **kwargs)
        functional.clear_sigma_cache()
        return out

    def __deepcopy__(self, memo):
        """The usual deep copy, with an id of its own (see the module docstring)."""
        if parametrize.is_parametrized(self):
            # torch's parametrized classes refuse __reduce_ex__ (pickling) but deep-copy by their
            # __dict__; the one they would add is hidden by this method, so do the same here
            new = memo.get(id(self))
            if new is not None:
                return new
            new = self.__new__(type(self))
            memo[id(self)] = new
            new.__dict__ = copy.deepcopy(self.__dict__, memo)
        else:
            new = copy._reconstruct(self, memo, *self.__reduce_ex__(4))
        if "noise_id" in self.__dict__:
            new._set_id(rng.mix64(self.noise_id, self.noise_copies))
            new.noise_copies = 0
            self.noise_copies += 1
        return new

    def extra_repr(self) -> str:
        tile = f", tile={self.tile}" if self.tile is not None else ""
        return f"{super().extra_repr()}, spec={self.spec}{tile}"


def chip_out_noise(read, key: int) -> tuple[int, int]:
    """(seed, offset) of a crossbar tile's output noise on a chip (``noise(hardware=...)``): read
    ``read.read`` of chip ``read.chip``, under the chip's read key (whose stream 4 is the read
    noise; the tile's output noise is stream 5), so each read of each chip has its own."""
    from .hardware.base import read_key

    return read_key(key, read.chip), read.read


def _outside_scope(forward):
    """Run a drop-in layer's forward with torch-function modes off while a noise scope
    (:mod:`fastnoise.intercept`) is active: the layer handles its own weight, and the scope's
    mode would otherwise see (and pay for) every op inside the layer."""

    @functools.wraps(forward)
    def wrapper(self, input):
        if context.local.scopes:
            with torch._C.DisableTorchFunction():
                return forward(self, input)
        return forward(self, input)

    return wrapper


class Linear(NoisyMixin, nn.Linear):
    """``torch.nn.Linear`` with Gaussian weight noise (see :class:`fastnoise.NoiseSpec`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, spec: Optional[NoiseSpec] = None, tile: Optional[TileSpec] = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_noise(spec)
        if tile is not None:
            self.set_tile(tile)

    @_outside_scope
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        tile = self.tile
        args = self._noise_args(chip=tile is not None)
        if args is None:
            return F.linear(input, self.weight, self.bias)
        spec, seed, offset = args
        if type(spec) is not NoiseSpec:  # a chip (fastnoise.noise(hardware=...))
            w = hardware_weight(self.weight, spec, seed)
            if tile is None:
                return F.linear(input, w, self.bias)
            return tile_linear(input, w, self.bias, self._parameters.get("input_range"), tile, None,
                               *chip_out_noise(spec, seed))
        if tile is not None:
            counts = self._buffers.get("input_range_update_idx") if self.training else None
            return tile_linear(input, self.weight, self.bias, self._parameters.get("input_range"), tile,
                               spec, seed, offset, update=counts)
        if _pregenerated_lookup is not None:
            pre = _pregenerated_lookup(self, spec, seed, offset, input)
            if pre is not None:  # inside fastnoise.pregenerated(...)
                return F.linear(input, *pre)
        return noisy_linear(input, self.weight, self.bias, spec, seed, offset)


class Conv2d(NoisyMixin, nn.Conv2d):
    """``torch.nn.Conv2d`` with Gaussian weight noise (see :class:`fastnoise.NoiseSpec`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, spec: Optional[NoiseSpec] = None,
                 tile: Optional[TileSpec] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        self._init_noise(spec)
        if tile is not None:
            self.set_tile(tile)

    @_outside_scope
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        tile = self.tile
        args = self._noise_args(chip=tile is not None)
        if args is None:
            return self._conv_forward(input, self.weight, self.bias)
        spec, seed, offset = args
        if type(spec) is not NoiseSpec:  # a chip (fastnoise.noise(hardware=...))
            w = hardware_weight(self.weight, spec, seed)
            if tile is None:
                return self._conv_forward(input, w, self.bias)
            return self._tile_forward(input, tile, None, *chip_out_noise(spec, seed), weight=w)
        if tile is not None:
            return self._tile_forward(input, tile, spec, seed, offset)
        if _pregenerated_lookup is not None:
            pre = _pregenerated_lookup(self, spec, seed, offset, input)
            if pre is not None:  # inside fastnoise.pregenerated(...)
                return self._conv_forward(input, *pre)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return noisy_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                            self.groups, spec, seed, offset)

    def _tile_forward(self, input, tile, spec, seed, offset, weight=None):
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        r = self._parameters.get("input_range")
        counts = self._buffers.get("input_range_update_idx") if self.training else None
        return tile_conv2d(input, self.weight if weight is None else weight, self.bias, self.stride, padding,
                           self.dilation, self.groups, r, tile, spec, seed, offset,
                           update=None if weight is not None else counts)
