"""A phase-change-memory (PCM) chip: programming error, drift and read noise over time.

The statistics are IBM aihwkit's ``PCMLikeNoiseModel`` (aihwkit 1.2.0,
``inference/noise/pcm.py``; fitted on measured PCM devices by Nandakumar et al., ICECS 2019, and
used by Joshi et al., Nature Communications 11:2473, 2020), evaluated as aihwkit's inference tile
does it (``program_weights`` then ``drift_weights(t)``, ``simulator/tiles/inference.py``), with
its global drift compensation (``inference/compensation/drift.py``). Conductances are in uS.

For a weight ``W`` (its ``[out, K]`` view, one tile, or the whole tensor):

1. Mapping to a pair of devices (``SinglePairConductanceConverter``): ``s = g_max / max|W|``,
   targets ``g+ = max(W, 0) s``, ``g- = max(-W, 0) s``.
2. Programming, each device of the pair: ``g_p = max(0, g + prog_noise_scale * sigma_p(g) * z)``,
   ``sigma_p(g) = (c0 + c1 g/g_max + c2 (g/g_max)^2) * g_max / g_ref`` with
   ``c = (0.26348, 1.9650, -1.1731)`` fitted at ``g_ref = 25`` uS. The programmed weight is
   ``W_p = (g+_p - g-_p) / s``.
3. The tile holds ``W_p``; drifting maps it again to a pair (``s' = g_max / max|W_p|``), so one
   device of each pair carries ``g = |W_p| s'`` and the other is 0.
4. Drift: ``g(t) = g ((t + t0) / t0)^-nu``, ``nu = drift_scale |mu + sd z|`` with
   ``mu = clip(-0.0155 ln(g_t/g_max) + 0.0244, 0.049, 0.1)`` and
   ``sd = clip(-0.0125 ln(g_t/g_max) - 0.0059, 0.008, 0.045)`` of that device's *target*
   ``g_t`` (step 1; ``g_t/g_max`` at least 1e-7), t0 = 20 s.
5. Read noise (1/f, accumulated since programming):
   ``g_r = max(0, g(t) + |g(t)| read_noise_scale Q sqrt(ln((t + t0 + t_read) / (2 t_read))) z)``,
   ``Q = min(0.2, 0.0088 / max(1e-3, (g / g_max)^0.65))``, t_read = 250 ns.
   ``W_t = +-g_r / s'`` (the sign of ``W_p``).
6. Global drift compensation: the output is scaled by ``alpha = mean|W_p| / mean|W_t|``, the
   mean absolute response of the tile to each input line once (the identity) at programming
   over the same at ``t`` (each at least 1e-4 max|W|); so the effective weight is ``alpha W_t``.

Where fastnoise differs from aihwkit on purpose: each device's random numbers are functions of
``(seed, chip, element)`` (and the read's of ``(seed, chip, read, element)``), so a chip is
a number, not a stored copy, and the same chip is seen at every ``t``; aihwkit draws the read
noise once per ``drift_weights`` call and keeps it for every later forward, fastnoise draws it
afresh for each read. See :mod:`fastnoise.hardware.base` for the streams.

Your own device: subclass :class:`PCM` and override :meth:`PCM.prog_std`,
:meth:`PCM.drift_stats` or :meth:`PCM.read_std` (each a function of conductances in uS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .base import (
    STREAM_DRIFT,
    STREAM_PROG,
    STREAM_READ,
    HardwareModel,
    NormalFn,
    check_chip,
    check_time,
    read_key,
    reference_normal,
)

__all__ = ["PCM", "PROG_COEFF"]

PROG_COEFF = (0.26348, 1.9650, -1.1731)  # uS at g_max = 25 uS (aihwkit's defaults)
_PROG_COEFF_G_REF = 25.0
_ZERO_CLIP = 1e-7


def _positive(name: str, v, allow_zero: bool = False) -> float:
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and (v >= 0 if allow_zero else v > 0))
    if not ok:
        raise ValueError(f"PCM.{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, "
                         f"got {v!r}")
    return float(v)


@dataclass(frozen=True)
class PCM(HardwareModel):
    """A PCM chip as aihwkit's ``PCMLikeNoiseModel`` with global drift compensation (see the
    module docstring for every formula).

    Args:
        g_max: the conductance (uS) that max|W| maps to.
        prog_noise_scale, read_noise_scale, drift_scale: multiply the programming-noise std, the
            read-noise std and the drift exponent (0 turns that effect off).
        compensation: global drift compensation (one output scale per weight).
        t_read: the read time of the 1/f noise fit (s); t0: the first read after programming (s).
        prog_coeff: the programming-std polynomial in g/g_max (uS), fitted at
            ``prog_coeff_g_max_reference`` (default: 25 uS for the default coefficients, else
            ``g_max``), as in aihwkit.
    """

    g_max: float = 25.0
    prog_noise_scale: float = 1.0
    read_noise_scale: float = 1.0
    drift_scale: float = 1.0
    compensation: bool = True
    t_read: float = 250.0e-9
    t0: float = 20.0
    prog_coeff: tuple = PROG_COEFF
    prog_coeff_g_max_reference: Optional[float] = None

    name = "pcm"

    def __post_init__(self):
        _positive("g_max", self.g_max)
        for f in ("prog_noise_scale", "read_noise_scale", "drift_scale"):
            _positive(f, getattr(self, f), allow_zero=True)
        _positive("t_read", self.t_read)
        _positive("t0", self.t0)
        if not isinstance(self.compensation, bool):
            raise TypeError(f"PCM.compensation must be a bool, got {self.compensation!r}")
        coeff = tuple(self.prog_coeff)
        if not coeff or not all(not isinstance(c, bool) and isinstance(c, (int, float))
                                and math.isfinite(c) for c in coeff):
            raise ValueError(f"PCM.prog_coeff must be finite numbers, got {self.prog_coeff!r}")
        object.__setattr__(self, "prog_coeff", tuple(float(c) for c in coeff))
        if self.prog_coeff_g_max_reference is not None:
            _positive("prog_coeff_g_max_reference", self.prog_coeff_g_max_reference)

    # ------------------------------------------------------------------ the device (override these)
    def prog_std(self, g: torch.Tensor) -> torch.Tensor:
        """Programming-error std (uS) of a device programmed to target ``g`` (uS)."""
        x = g / self.g_max
        std = torch.full_like(g, self.prog_coeff[0])
        p = torch.ones_like(g)
        for c in self.prog_coeff[1:]:
            p = p * x
            std = std + c * p
        return std * (self.g_max / self.prog_reference())

    def prog_reference(self) -> float:
        """The g_max (uS) the programming polynomial was fitted at."""
        ref = self.prog_coeff_g_max_reference
        if ref is None:
            ref = _PROG_COEFF_G_REF if self.prog_coeff == PROG_COEFF else self.g_max
        return ref

    def drift_stats(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the normal whose absolute value is a device's drift exponent nu, for a
        device of target ``g`` (uS); ``drift_scale`` multiplies nu afterwards."""
        lg = torch.log((g / self.g_max).abs().clamp(min=_ZERO_CLIP))
        mu = (-0.0155 * lg + 0.0244).clamp(min=0.049, max=0.1)
        sd = (-0.0125 * lg - 0.0059).clamp(min=0.008, max=0.045)
        return mu, sd

    def read_std(self, g: torch.Tensor, t: float) -> torch.Tensor:
        """Relative std of a read at ``t`` s after programming of a device programmed to ``g``
        (uS); ``read_noise_scale`` multiplies it."""
        q = (0.0088 / ((g.abs() / self.g_max) ** 0.65).clamp(min=1e-3)).clamp(max=0.2)
        total = t + self.t0
        return q * math.sqrt(math.log((total + self.t_read) / (2 * self.t_read)))

    # ------------------------------------------------------------------ the chip
    def programmed(self, weight: torch.Tensor, key: int, chip: int,
                   normal: Optional[NormalFn] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_p, g_target)``: chip ``chip``'s programmed ``[out, K]`` weight and the targets
        ``[2, out, K]`` (uS) of its device pairs. Computed in float32 (float64 for float64)."""
        normal = normal or reference_normal
        w = _view(weight)
        out, k = w.shape
        s = self.g_max / w.abs().amax().clamp(min=_ZERO_CLIP)
        g = torch.stack((w.clamp(min=0), (-w).clamp(min=0))).mul_(s).clamp_(max=self.g_max)
        z = normal(key, chip, 2 * out, k, STREAM_PROG, w.device).reshape(2, out, k).to(w.dtype)
        gp = (z.mul_(self.prog_std(g)).mul_(self.prog_noise_scale)).add_(g).clamp_(min=0)
        return (gp[0] - gp[1]).div_(s), g

    def effective_weight(self, weight: torch.Tensor, key: int, chip: int, t: float, read: int = 0,
                         normal: Optional[NormalFn] = None) -> torch.Tensor:
        """Chip ``chip``'s weight at ``t`` s after programming, as read ``read`` sees it:
        ``[out, K]`` in float32 (float64 for a float64 weight); the reference computation."""
        t = check_time(t)
        check_chip(chip)
        normal = normal or reference_normal
        w = _view(weight)
        if w.numel() == 0:
            return w.clone()
        out, k = w.shape
        wp, g_target = self.programmed(w, key, chip, normal)
        amax_p = wp.abs().amax().clamp(min=_ZERO_CLIP)
        s2 = self.g_max / amax_p
        pos = wp >= 0
        g = wp.abs().mul_(s2)  # the device of the pair that holds W_p
        mu, sd = self.drift_stats(torch.where(pos, g_target[0], g_target[1]))
        del g_target
        z = normal(key, chip, out, k, STREAM_DRIFT, w.device).to(w.dtype)
        nu = z.mul_(sd).add_(mu).abs_().mul_(self.drift_scale)
        del mu, sd
        g_t = nu.mul_(-math.log((t + self.t0) / self.t0)).exp_().mul_(g)  # g ((t + t0) / t0)^-nu
        sig = self.read_std(g, t).mul_(self.read_noise_scale)
        del g
        z = normal(read_key(key, chip), int(read) & 0xFFFFFFFF, out, k, STREAM_READ, w.device)
        g_r = z.to(w.dtype).mul_(sig).mul_(g_t.abs()).add_(g_t).clamp_(min=0)
        del sig, g_t
        w_t = torch.where(pos, g_r, -g_r).div_(s2)
        if self.compensation:
            floor = 1e-4 * float(w.abs().amax())
            alpha = wp.abs().mean().clamp(min=floor) / w_t.abs().mean().clamp(min=floor)
            w_t.mul_(alpha)
        return w_t


def _view(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach()
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    return w.reshape(w.shape[0], -1).to(dt)
