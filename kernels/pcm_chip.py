"""A PCM chip's effective weight in Triton: :meth:`fastnoise.PCM.effective_weight` (its module
docstring has every formula) in two launches over the weight and one scale, the contract's
normals drawn in the kernels (:func:`normal_tile`) instead of weight-sized tensors.

- ``_program``: per ``[BR, BC]`` block, the two devices' programming errors (stream 2, rows
  ``r`` and ``out + r``), ``W_p`` written into the output, the block's max ``|W_p|`` and sum
  ``|W_p|`` into a small partials tensor;
- ``_drift``: the drift exponent (stream 3) and the read noise (stream 4, the read key) of the
  device that holds ``W_p``; ``W_t`` over ``W_p`` and the block's sum ``|W_t|``;
- the global drift compensation (``mean |W_p| / mean |W_t|``) is one multiply by torch.

The weight is a contiguous float32 ``[out, K]`` view; the partials are added by torch in a fixed
order, so a chip does not depend on the launch. ln / exp are Triton's (the GPU's fast float32
functions, numpy's under the interpreter): the chip agrees with the reference to a few ulps.
"""

import math

import torch
import triton
import triton.language as tl

from .philox import normal_tile

BLOCK_R = 16
BLOCK_C = 128
_ZERO_CLIP = 1e-7  # fastnoise.hardware.pcm._ZERO_CLIP


@triton.jit
def _target(v, s, g_max):
    return tl.minimum(tl.maximum(v, 0.0) * s, g_max)


@triton.jit
def _prog_std(g, g_max, c0, c1, c2, c3, std_scale):
    x = g / g_max
    p = x
    std = c0 + c1 * p
    p = p * x
    std = std + c2 * p
    p = p * x
    std = std + c3 * p
    return std * std_scale


@triton.jit
def _block(pid_r, pid_c, R, C, BR: tl.constexpr, BC: tl.constexpr):
    """The mask and element offsets of block ``(pid_r, pid_c)`` of the contiguous ``[R, C]``."""
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    return mask, rows.to(tl.int64)[:, None] * C + cols[None, :]


@triton.jit
def _program(w_ptr, out_ptr, part_ptr, amax_ptr, key_lo, key_hi, chip, R, C,
             g_max, prog_scale, std_scale, c0, c1, c2, c3, BR: tl.constexpr, BC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    mask, off = _block(pid_r, pid_c, R, C, BR, BC)
    w = tl.load(w_ptr + off, mask=mask, other=0.0)
    s = g_max / tl.maximum(tl.load(amax_ptr), 1e-7)
    g0 = _target(w, s, g_max)
    g1 = _target(-w, s, g_max)
    z0 = normal_tile(key_lo, key_hi, chip, 2, pid_r * BR, pid_c * BC, BR, BC)
    z1 = normal_tile(key_lo, key_hi, chip, 2, R + pid_r * BR, pid_c * BC, BR, BC)
    p0 = tl.maximum(z0 * _prog_std(g0, g_max, c0, c1, c2, c3, std_scale) * prog_scale + g0, 0.0)
    p1 = tl.maximum(z1 * _prog_std(g1, g_max, c0, c1, c2, c3, std_scale) * prog_scale + g1, 0.0)
    wp = (p0 - p1) / s
    tl.store(out_ptr + off, wp, mask=mask)
    a = tl.where(mask, tl.abs(wp), 0.0)
    pid = pid_r * tl.num_programs(1) + pid_c
    tl.store(part_ptr + 2 * pid, tl.max(tl.max(a, axis=1), axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(tl.sum(a, axis=1), axis=0))


@triton.jit
def _drift(w_ptr, io_ptr, part_ptr, amax_ptr, amax_p_ptr, key_lo, key_hi, rkey_lo, rkey_hi, chip, read,
           R, C, g_max, drift_scale, read_scale, log_drift, read_time, BR: tl.constexpr, BC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    mask, off = _block(pid_r, pid_c, R, C, BR, BC)
    w = tl.load(w_ptr + off, mask=mask, other=0.0)
    wp = tl.load(io_ptr + off, mask=mask, other=0.0)
    s = g_max / tl.maximum(tl.load(amax_ptr), 1e-7)
    s2 = g_max / tl.maximum(tl.load(amax_p_ptr), 1e-7)
    pos = wp >= 0.0
    g = tl.abs(wp) * s2  # the device of the pair that holds W_p
    gt = _target(tl.where(pos, w, -w), s, g_max)  # its target
    lg = tl.log(tl.maximum(tl.abs(gt / g_max), 1e-7))
    mu = tl.minimum(tl.maximum(-0.0155 * lg + 0.0244, 0.049), 0.1)
    sd = tl.minimum(tl.maximum(-0.0125 * lg - 0.0059, 0.008), 0.045)
    zd = normal_tile(key_lo, key_hi, chip, 3, pid_r * BR, pid_c * BC, BR, BC)
    nu = tl.abs(zd * sd + mu) * drift_scale
    gd = tl.exp(nu * log_drift) * g
    # (g / g_max)^0.65, below 1e-3 (g / g_max < 2.4e-5) clamped: ln of at least 1e-6 serves
    pw = tl.exp(0.65 * tl.log(tl.maximum(tl.abs(g) / g_max, 1e-6)))
    q = tl.minimum(0.0088 / tl.maximum(pw, 1e-3), 0.2)
    zr = normal_tile(rkey_lo, rkey_hi, read, 4, pid_r * BR, pid_c * BC, BR, BC)
    gr = tl.maximum(zr * (q * read_time * read_scale) * tl.abs(gd) + gd, 0.0)
    wt = tl.where(pos, gr, -gr) / s2
    tl.store(io_ptr + off, wt, mask=mask)
    pid = pid_r * tl.num_programs(1) + pid_c
    tl.store(part_ptr + pid, tl.sum(tl.sum(tl.where(mask, tl.abs(wt), 0.0), axis=1), axis=0))


def pcm_weight(w: torch.Tensor, key: int, read_key: int, chip: int, read: int, t: float,
               device: tuple, prog_coeff: tuple) -> torch.Tensor:
    """Chip ``chip``'s float32 ``[out, K]`` weight at ``t`` s, read ``read``, of a float32
    ``[out, K]`` weight; ``device`` as ``fastnoise_cpu::pcm_weight`` takes it (g_max, the three
    scales, compensation, t_read, t0, the polynomial's reference g_max), at most 4 coefficients."""
    g_max, prog_scale, read_scale, drift_scale, compensation, t_read, t0, ref = (float(v) for v in device)
    coeff = [float(c) for c in prog_coeff] + [0.0] * (4 - len(prog_coeff))
    w = w.detach().float().contiguous()
    R, C = w.shape
    out = torch.empty_like(w)
    if w.numel() == 0:
        return out
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    n = grid[0] * grid[1]
    amax = w.abs().amax().reshape(1)
    part = torch.empty(n, 2, dtype=torch.float32, device=w.device)
    _program[grid](w, out, part, amax, key & 0xFFFFFFFF, key >> 32, chip, R, C,
                   g_max, prog_scale, g_max / ref, *coeff, BR=BLOCK_R, BC=BLOCK_C)
    amax_p = part[:, 0].amax().reshape(1)
    sum_p = part[:, 1].sum()
    part_t = torch.empty(n, dtype=torch.float32, device=w.device)
    log_drift = -math.log((t + t0) / t0)
    read_time = math.sqrt(math.log((t + t0 + t_read) / (2 * t_read)))
    _drift[grid](w, out, part_t, amax, amax_p, key & 0xFFFFFFFF, key >> 32,
                 read_key & 0xFFFFFFFF, read_key >> 32, chip, read & 0xFFFFFFFF, R, C,
                 g_max, drift_scale, read_scale, log_drift, read_time, BR=BLOCK_R, BC=BLOCK_C)
    if compensation:
        floor = 1e-4 * amax
        alpha = (sum_p / w.numel()).clamp(min=floor) / (part_t.sum() / w.numel()).clamp(min=floor)
        out.mul_(alpha)
    return out
