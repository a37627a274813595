"""The crossbar tile: what an analog chip does to ``y = x W^T`` besides the weight noise.

A :class:`TileSpec` describes it, with the meanings of aihwkit-lightning's
``TorchInferenceRPUConfig`` fields (``docs/tile.md`` maps each one). For a layer with
``K`` inputs, in the order the signal meets it:

1. K is split into ``T = ceil(K / max_input_size)`` tiles of balanced sizes (the first
   ``K mod T`` tiles one row longer), as aihwkit-lightning's ``get_split_sizes``.
2. Per tile ``t`` the input is clipped to ``[-r_t, r_t]`` (``r`` the layer's ``input_range``
   parameter, one value per tile) and quantized by the DAC: ``round(x / s) * s`` with
   ``s = 2 r_t / inp_res``.
3. The weights are the layer's (with the weight noise of its NoiseSpec while training); the
   partial output is ``p_t = x_q[:, tile] @ W[:, tile]^T``.
4. Output noise ``p_t += out_noise / sqrt(T) * r_t * wmax_t * z``, ``wmax_t`` the tile's
   ``max |W|`` per output channel (``out_noise_per_channel``) or of the whole tile, ``z`` the
   noise contract's normals on stream 5 (:data:`STREAM_TILE_OUT`), row ``t * M + m``.
5. The ADC: ``p_t`` quantized to ``out_res`` steps of ``2 b / out_res`` and clipped to
   ``[-b, b]``, ``b = out_bound * r_t * wmax_t`` (per output channel with
   ``bound_per_channel``, else the tile's max).
6. ``y = sum_t p_t + bias`` (digital).

Gradients (aihwkit-lightning's straight-through definitions): quantization passes the
gradient; the ADC clip passes it where ``|q| < b`` and half of it where ``|q| == b`` (the top
level often lands exactly there; torch's clamp with tensor bounds, which aihwkit-lightning uses,
splits such a tie between the value and the bound); the input clip passes it to ``x`` where
``|x| <= r``, and gives ``r_t`` the gradient
``r_t * (sum_{x >= r} min(g, 0) - sum_{x <= -r} max(g, 0)) + decay * r_t * [share of unclipped
inputs > input_min_percentage]`` (``g`` the gradient at the clipped input). Weight clipping
(``clip``) is applied to the weights after each optimizer step (:func:`clip_weight_`), not in
the forward.

This module is the base layer's: it holds the spec and the arithmetic helpers only; the
reference forward is :func:`fastnoise.reference.tile_linear_forward`, the autograd op
:mod:`fastnoise.tile_ops`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

__all__ = ["TileSpec", "STREAM_TILE_OUT", "CLIPS", "split_sizes", "clip_weight_", "bits_to_res"]

STREAM_TILE_OUT = 5  # the noise contract's stream of the tile output noise (rng: 0 weight, 1 bias)
CLIPS = ("sigma", "sigma_per_channel", "fixed")


def bits_to_res(bits: int) -> int:
    """Steps of a converter of ``bits`` bits as aihwkit counts them: ``2**bits - 2``."""
    return 2 ** int(bits) - 2


def _real(name: str, v, *, positive: bool = False, allow_none: bool = False, at_least=None):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"TileSpec.{name} must be a real number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"TileSpec.{name} must be finite, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"TileSpec.{name} must be > 0, got {v!r}")
    if at_least is not None and v < at_least:
        raise ValueError(f"TileSpec.{name} must be >= {at_least}, got {v!r}")
    return v


@dataclass(frozen=True)
class TileSpec:
    """The crossbar tile of a layer (see the module docstring for the arithmetic).

    Args:
        max_input_size: rows per crossbar tile (``mapping.max_input_size``); None: one tile.
        inp_bits / inp_res: DAC resolution, in bits (``inp_res = 2**bits - 2`` steps) or in
            steps (``forward.inp_res``); None: no DAC quantization.
        out_bits / out_res: ADC resolution, the same way (``forward.out_res``); needs ``out_bound``.
        out_bound: ADC bound relative to ``input_range * max|W|`` (``forward.out_bound``).
        bound_per_channel: ``max|W|`` of the bound per output channel (aihwkit-lightning does
            this where the clipping is per channel), else the tile's.
        out_noise: output noise std relative to ``input_range * max|W|`` (``forward.out_noise``),
            divided by ``sqrt(T)``; drawn in train mode and inside ``fastnoise.noise(...)``.
        out_noise_per_channel: ``max|W|`` of the output noise per output channel.
        input_range: clip the input of each tile to a range (``pre_post.input_range.enable``);
            the DAC, the ADC and the output noise need it.
        learn_input_range: train the ranges (straight-through gradient and decay).
        input_range_init: initial range (``init_value``).
        init_from_data: the first this many training forwards set the range to the running
            mean of ``init_std_alpha * std(x)`` of the tile's input (0: off).
        init_std_alpha, decay, input_min_percentage: as aihwkit-lightning's ``input_range``.
        clip: weight clipping after every optimizer step: ``"sigma"`` (``+-clip_sigma *
            std(W)``), ``"sigma_per_channel"`` (per output channel), ``"fixed"``
            (``+-clip_value``); None: no clipping.
        clip_sigma / clip_value: its size.
    """

    max_input_size: Optional[int] = None
    inp_bits: Optional[int] = None
    inp_res: Optional[float] = None
    out_bits: Optional[int] = None
    out_res: Optional[float] = None
    out_bound: Optional[float] = None
    bound_per_channel: bool = False
    out_noise: float = 0.0
    out_noise_per_channel: bool = False
    input_range: bool = True
    learn_input_range: bool = True
    input_range_init: float = 3.0
    init_from_data: int = 100
    init_std_alpha: float = 3.0
    decay: float = 0.001
    input_min_percentage: float = 0.95
    clip: Optional[str] = None
    clip_sigma: float = 2.5
    clip_value: Optional[float] = None

    def __post_init__(self):
        s = object.__setattr__
        m = self.max_input_size
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, int):
                raise TypeError(f"TileSpec.max_input_size must be an int or None, got {m!r}")
            if m < 1:
                raise ValueError(f"TileSpec.max_input_size (the tile size) must be >= 1, got {m!r}")
        for kind in ("inp", "out"):
            bits, res = getattr(self, f"{kind}_bits"), getattr(self, f"{kind}_res")
            if bits is not None:
                if isinstance(bits, bool) or not isinstance(bits, int):
                    raise TypeError(f"TileSpec.{kind}_bits must be an int or None, got {bits!r}")
                if bits < 2:
                    raise ValueError(f"TileSpec.{kind}_bits must be >= 2, got {bits!r}")
                if res is not None and float(res) != bits_to_res(bits):
                    raise ValueError(f"TileSpec.{kind}_bits={bits} and {kind}_res={res!r} disagree "
                                     f"({bits} bits are {bits_to_res(bits)} steps); give one")
                s(self, f"{kind}_res", float(bits_to_res(bits)))
            elif res is not None:
                res = _real(f"{kind}_res", res)
                if res < 2:
                    raise ValueError(f"TileSpec.{kind}_res must be >= 2 steps (2 bits), got {res!r}")
                s(self, f"{kind}_res", res)
                b = math.log2(res + 2)  # bits and steps name one converter: equal specs compare equal
                s(self, f"{kind}_bits", int(b) if b == int(b) else None)
        if self.out_bound is not None:
            s(self, "out_bound", _real("out_bound", self.out_bound, positive=True))
        s(self, "out_noise", _real("out_noise", self.out_noise, at_least=0.0))
        s(self, "input_range_init", _real("input_range_init", self.input_range_init, positive=True))
        for name in ("bound_per_channel", "out_noise_per_channel", "input_range", "learn_input_range"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TileSpec.{name} must be a bool, got {getattr(self, name)!r}")
        n = self.init_from_data
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"TileSpec.init_from_data must be an int >= 0, got {n!r}")
        s(self, "init_std_alpha", _real("init_std_alpha", self.init_std_alpha, positive=True))
        s(self, "decay", _real("decay", self.decay, at_least=0.0))
        p = _real("input_min_percentage", self.input_min_percentage)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"TileSpec.input_min_percentage must be in [0, 1], got {p!r}")
        s(self, "input_min_percentage", p)
        if self.clip is not None and self.clip not in CLIPS:
            raise ValueError(f"TileSpec.clip must be one of {CLIPS} or None, got {self.clip!r}")
        s(self, "clip_sigma", _real("clip_sigma", self.clip_sigma, positive=True))
        if self.clip_value is not None:
            s(self, "clip_value", _real("clip_value", self.clip_value, positive=True))
        if self.clip == "fixed" and self.clip_value is None:
            raise ValueError("TileSpec.clip='fixed' needs clip_value (the bound, > 0)")
        if self.out_res is not None and self.out_bound is None:
            raise ValueError(f"TileSpec.out_res={self.out_res:g} (ADC quantization) needs out_bound")
        if not self.input_range:
            for name, on in (("inp_res", self.inp_res is not None), ("out_bound", self.out_bound is not None),
                             ("out_noise", self.out_noise > 0)):
                if on:
                    raise ValueError(f"TileSpec.{name} is relative to the input range: it needs "
                                     "input_range=True")

    def replace(self, **changes) -> TileSpec:
        """A copy with some fields changed (validated again; bits and steps follow each other)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for kind in ("inp", "out"):
            if f"{kind}_res" in changes and f"{kind}_bits" not in changes:
                values[f"{kind}_bits"] = None
            if f"{kind}_bits" in changes and f"{kind}_res" not in changes:
                values[f"{kind}_res"] = None
        values.update(changes)
        return TileSpec(**values)

    def sizes(self, k: int) -> list:
        """The tile sizes of ``k`` inputs (see :func:`split_sizes`)."""
        return split_sizes(k, self.max_input_size)

    @property
    def has_output_noise(self) -> bool:
        return self.out_noise > 0

    def __str__(self) -> str:
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_bits"):
                continue
            if v != f.default:
                parts.append(f"{f.name}={v:g}" if isinstance(v, float) else f"{f.name}={v!r}")
        return f"TileSpec({', '.join(parts)})"


def split_sizes(k: int, max_input_size: Optional[int]) -> list:
    """``k`` inputs in ``ceil(k / max_input_size)`` balanced tiles (aihwkit-lightning's split)."""
    if max_input_size is None or max_input_size <= 0 or k <= max_input_size:
        return [k]
    n = (k + max_input_size - 1) // max_input_size
    base, extra = divmod(k, n)
    return [base + (i < extra) for i in range(n)]


@torch.no_grad()
def clip_weight_(weight: torch.Tensor, tile: TileSpec) -> None:
    """Clip ``weight`` in place as ``tile.clip`` says (its GEMM view's rows are the channels).

    ``"sigma"``: to ``+-clip_sigma * std(W)`` (unbiased std of the whole weight, as torch's
    ``std``); ``"sigma_per_channel"``: the same per output channel; ``"fixed"``: ``+-clip_value``.
    """
    if tile.clip is None:
        return
    if tile.clip == "fixed":
        weight.clamp_(-tile.clip_value, tile.clip_value)
        return
    w2 = weight.reshape(weight.shape[0], -1)
    if tile.clip == "sigma":
        b = (tile.clip_sigma * w2.float().std()).to(weight.dtype)
        weight.clamp_(-b, b)
        return
    b = (tile.clip_sigma * w2.float().std(dim=1, keepdim=True)).to(weight.dtype)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.copy_(torch.maximum(torch.minimum(weight, b.reshape(shape)), -b.reshape(shape)))
