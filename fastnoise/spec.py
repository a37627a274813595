"""Noise specifications: how large the Gaussian weight noise is.

For a weight ``W`` seen as its 2-D GEMM view ``[out, K]`` the noisy weight is
``W + sigma * z`` with ``z ~ N(0, 1)`` i.i.d. (see :mod:`fastnoise.rng`). ``sigma`` is
computed from the detached weight, so gradients are straight-through:

=======================  ============================================  ======================
scale                    sigma                                         reference
=======================  ============================================  ======================
``range``                ``eta * (max W - min W)`` per tensor          Zhou et al. 2020
``absmax``               ``eta * max |W|`` per tensor                  Joshi et al. 2020
``absmax_per_channel``   ``eta * max_j |W[i, j]|`` per output channel  IBM aihwkit
``proportional``         ``eta * |W|`` elementwise                     device variation
=======================  ============================================  ======================

With ``noise_bias=True`` the bias is treated as one more column of ``W``: it takes part in
the statistics above and receives noise of the same size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .dispatch import tracing

__all__ = ["NoiseSpec", "SCALES", "MODE_TENSOR", "MODE_ROW", "MODE_PROPORTIONAL"]

SCALES = ("range", "absmax", "absmax_per_channel", "proportional")

# How the kernels read the sigma tensor (an int, so it can travel through custom ops).
MODE_TENSOR = 0  # sigma: [1], one value for the whole tensor
MODE_ROW = 1  # sigma: [out], one value per output channel
MODE_PROPORTIONAL = 2  # sigma: [1] holding eta; the noise scale is eta * |w| per element

_MODES = {
    "range": MODE_TENSOR,
    "absmax": MODE_TENSOR,
    "absmax_per_channel": MODE_ROW,
    "proportional": MODE_PROPORTIONAL,
}


@dataclass(frozen=True)
class NoiseSpec:
    """How much noise a layer gets.

    Args:
        eta: relative noise strength, a finite number >= 0 (0 means no noise).
        scale: one of ``"range"``, ``"absmax"``, ``"absmax_per_channel"``, ``"proportional"``.
        noise_bias: also perturb the bias (it then counts as a column of the weight).
    """

    eta: float = 0.06
    scale: str = "range"
    noise_bias: bool = False

    def __post_init__(self):
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)):
            raise TypeError(f"NoiseSpec.eta must be a real number, got {self.eta!r}")
        eta = float(self.eta)
        if math.isnan(eta) or math.isinf(eta) or eta < 0:
            raise ValueError(f"NoiseSpec.eta must be finite and >= 0, got {self.eta!r}")
        object.__setattr__(self, "eta", eta)
        if self.scale not in SCALES:
            raise ValueError(f"NoiseSpec.scale must be one of {SCALES}, got {self.scale!r}")
        if not isinstance(self.noise_bias, bool):
            raise TypeError(f"NoiseSpec.noise_bias must be a bool, got {self.noise_bias!r}")

    @property
    def mode(self) -> int:
        """How kernels interpret the tensor returned by :meth:`sigma`."""
        return _MODES[self.scale]

    def replace(self, **changes) -> NoiseSpec:
        """A copy with some fields changed (validated again)."""
        fields = {"eta": self.eta, "scale": self.scale, "noise_bias": self.noise_bias}
        fields.update(changes)
        return NoiseSpec(**fields)

    def sigma(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 sigma tensor the kernels read (see :attr:`mode`), on ``weight.device``.

        ``[1]`` for per-tensor scales and ``proportional`` (where it holds ``eta``),
        ``[out]`` for ``absmax_per_channel``.

        From the finite elements only: a NaN or inf in the weight then poisons the outputs that
        torch would poison (those that multiply it), not every output of the layer. On the CPU
        the check is one read of sigma and such a weight warns once; on CUDA and in traced graphs,
        where it would cost a host synchronisation, a non-finite sigma becomes 0 (that call of
        that layer draws no noise) without a warning.
        """
        # min/max in the weight's own dtype (exact, and no float32 copy of W), then float32
        w = weight.detach().reshape(weight.shape[0], -1)
        b = None
        if self.noise_bias and bias is not None:
            b = bias.detach().float().reshape(-1, 1)
        if self.scale == "proportional":
            return torch.full((1,), self.eta, dtype=torch.float32, device=weight.device)
        s = self._from(w, b, finite=False)
        if weight.device.type != "cpu" or tracing():
            return torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
        # read in place (a CPU tensor, no torch op: the training path's host time counts)
        a = s.numpy()
        if math.isfinite(a.item()) if a.size == 1 else np.isfinite(a).all():  # .item(): 1/4 the cost
            return s
        s = self._from(w, b, finite=True)  # sigma of the finite elements
        _warn_nonfinite(weight)
        return torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)

    def _from(self, w: torch.Tensor, b, finite: bool) -> torch.Tensor:
        if finite:
            ok = torch.isfinite(w)
            w_lo, w_hi = torch.where(ok, w, torch.inf), torch.where(ok, w, -torch.inf)
            if b is not None:
                b = torch.where(torch.isfinite(b), b, 0.0)
        if self.scale == "absmax_per_channel":
            if finite:
                lo, hi = w_lo.amin(dim=1), w_hi.amax(dim=1)
            else:
                lo, hi = torch.aminmax(w, dim=1)
            m = torch.maximum(hi.float(), -lo.float())
            if b is not None:
                m = torch.maximum(m, b.abs().reshape(-1))
            return m * self.eta
        lo, hi = (w_lo.amin(), w_hi.amax()) if finite else torch.aminmax(w)
        lo, hi = lo.float(), hi.float()
        if self.scale == "range":
            if b is not None:
                hi, lo = torch.maximum(hi, b.max()), torch.minimum(lo, b.min())
            return ((hi - lo) * self.eta).reshape(1)
        m = torch.maximum(hi, -lo)  # absmax
        if b is not None:
            m = torch.maximum(m, b.abs().max())
        return (m * self.eta).reshape(1)

    def __str__(self) -> str:
        bias = ", noise_bias=True" if self.noise_bias else ""
        return f"NoiseSpec(eta={self.eta:g}, scale={self.scale!r}{bias})"


_warned_nonfinite: list = []


def _warn_nonfinite(weight: torch.Tensor) -> None:
    if _warned_nonfinite:
        return
    _warned_nonfinite.append(True)
    bad = int((~torch.isfinite(weight.detach())).sum())
    warnings.warn(f"fastnoise: a weight of shape {tuple(weight.shape)} has {bad} NaN or inf element(s); "
                  "its noise scale is taken from the finite elements (warned once)", RuntimeWarning,
                  stacklevel=4)
