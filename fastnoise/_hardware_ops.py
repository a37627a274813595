"""A chip's effective weight on every backend: the hardware model's computation
(:mod:`fastnoise.hardware`) fed by the fastest generator of the contract's normals at hand.

- CPU (float16 / bfloat16 / float32 weights): the C++ generator of ``csrc/`` when it is built;
- CUDA: the Triton generator of ``kernels/noise_gen.py`` (``0 + 1 * z`` on the stream asked
  for; the tests run it on CPU tensors under ``TRITON_INTERPRET=1``);
- otherwise, and for float64: the pure-PyTorch reference (:func:`fastnoise.rng.normal_grid`).

All three draw the same z (to a few float32 ulps), so chip ``k`` at ``t`` is the same chip on
every backend. The layers call :func:`hardware_weight` once per forward, then the clean op
(the generate path: the effective weight lives as long as the op that reads it).

On the CPU, a :class:`~fastnoise.PCM` whose device functions are PCM's own (not overridden by a
subclass) runs as one C++ op instead (``fastnoise_cpu::pcm_weight``, ``csrc/ops/cpu/pcm_cpu.cpp``):
the same formulas in three passes over the weight, the normals drawn a row at a time, where the
PyTorch composition makes about 25 passes and a dozen weight-sized temporaries; on CUDA the
same in two Triton launches (``kernels/pcm_chip.py``). All give the same chip to a few float32
ulps (``tests/test_hardware_pcm.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _cpu, dispatch
from .hardware.base import HardwareRead, NormalFn, check_chip, check_time, read_key, reference_normal
from .hardware.pcm import PCM

__all__ = ["hardware_weight", "normal_for"]


def _cpu_normal(key, offset, rows, cols, stream, device):
    return _cpu.normal_grid(key, offset, rows, cols, stream)


def _triton_normal(key, offset, rows, cols, stream, device):
    from .kernels import noise_gen
    from .spec import NoiseSpec

    src = torch.zeros(rows, cols, dtype=torch.float32, device=device)
    out = torch.empty_like(src)
    one = torch.ones(1, dtype=torch.float32, device=device)
    off = torch.tensor(offset, dtype=torch.int64, device=device)
    return noise_gen._launch(src, out, one, NoiseSpec(scale="range").mode, key, off, stream, rows, False)


def normal_for(weight: Tensor) -> NormalFn:
    """The generator of the contract's normals that serves ``weight``'s device and dtype."""
    if weight.dtype not in dispatch.KERNEL_DTYPES:
        return reference_normal
    if weight.device.type == "cuda" and dispatch.triton_usable(weight)[0]:
        return _triton_normal
    if weight.device.type == "cpu" and _cpu.available():
        return _cpu_normal
    return reference_normal


_PCM_DEVICE = ("prog_std", "prog_reference", "drift_stats", "read_std", "programmed", "effective_weight")


def _fused_pcm(model, weight: Tensor) -> Optional[str]:
    """Which fused PCM op serves ``model`` on ``weight`` (``"cpu"``: the C++ op, ``"triton"``:
    the Triton kernels on CUDA), or None: a PCM with PCM's own device functions and at most four
    programming coefficients, a weight of a kernel dtype, the kernels at hand."""
    if not (isinstance(model, PCM) and weight.dtype in dispatch.KERNEL_DTYPES and weight.numel() > 0
            and len(model.prog_coeff) <= 4
            and all(getattr(type(model), f) is getattr(PCM, f) for f in _PCM_DEVICE)):
        return None
    if weight.device.type == "cpu" and _cpu.available():
        return "cpu"
    if weight.device.type == "cuda" and dispatch.triton_usable(weight)[0]:
        return "triton"
    return None


def _pcm_args(model: PCM, weight: Tensor, key: int, chip: int, t: float, read: int) -> tuple:
    t, chip = check_time(t), check_chip(chip)
    device = (model.g_max, model.prog_noise_scale, model.read_noise_scale, model.drift_scale,
              float(model.compensation), model.t_read, model.t0, model.prog_reference())
    w = weight.detach().reshape(weight.shape[0], -1).float()
    return w, key, read_key(key, chip), chip, int(read) & 0xFFFFFFFF, t, device, model.prog_coeff


def _pcm_cpu(model: PCM, weight: Tensor, key: int, chip: int, t: float, read: int) -> Tensor:
    return _cpu.pcm_weight(*_pcm_args(model, weight, key, chip, t, read))


def _pcm_triton(model: PCM, weight: Tensor, key: int, chip: int, t: float, read: int) -> Tensor:
    from .kernels import pcm_chip

    return pcm_chip.pcm_weight(*_pcm_args(model, weight, key, chip, t, read))


def hardware_weight(weight: Tensor, read: HardwareRead, key: int,
                    normal: Optional[NormalFn] = None) -> Tensor:
    """Chip ``read.chip``'s ``weight`` at ``read.t`` for read ``read.read``, in ``weight``'s shape
    and dtype. The gradient is straight-through (as for Gaussian noise): ``W + (W_eff - W)``.
    ``normal`` forces the model's own (PyTorch) computation with that generator."""
    with torch.no_grad():
        fused = _fused_pcm(read.model, weight) if normal is None else None
        if fused is not None:
            op = _pcm_cpu if fused == "cpu" else _pcm_triton
            w_eff = op(read.model, weight, key, read.chip, read.t, read.read)
        else:
            normal = normal or normal_for(weight)
            w_eff = read.model.effective_weight(weight, key, read.chip, read.t, read.read, normal)
        w_eff = w_eff.reshape(weight.shape).to(weight.dtype)
        if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
            w_eff = w_eff.contiguous(memory_format=torch.channels_last)
    if torch.is_grad_enabled() and weight.requires_grad:
        return weight + (w_eff - weight).detach()
    return w_eff
