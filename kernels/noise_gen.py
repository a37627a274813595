"""Generate ``W + sigma * z`` once, in the compute dtype, for cuBLAS / cuDNN to consume.

The buffer lives only as long as the matmul or conv that reads it; nothing of it is saved for
backward (the backward regenerates it). Weights of up to 4 dims are read through their strides
in the canonical GEMM order ``[out, in * kh * kw]``, so channels_last conv weights need no copy
and the output keeps the weight's memory format.
"""

import torch
import triton
import triton.language as tl

from .philox import noise_scale, normal_tile

BLOCK_R = 16
BLOCK_C = 128


@triton.jit
def _noisy_weight_kernel(
    w_ptr, out_ptr, sigma_ptr, offset_ptr, seed_lo, seed_hi, stream,
    R, C, D2, D3,
    sw0, sw1, sw2, sw3, so0, so1, so2, so3,
    MODE: tl.constexpr, SIGMA_BY_COL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)  # [BR]
    cols = pid_c * BC + tl.arange(0, BC)  # [BC]
    rmask = rows < R
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    # canonical column -> (i1, i2, i3) of a [R, D1, D2, D3] weight
    i3 = cols % D3
    t = cols // D3
    i2 = t % D2
    i1 = t // D2
    r64 = rows.to(tl.int64)[:, None]
    w_off = r64 * sw0 + (i1.to(tl.int64) * sw1 + i2 * sw2 + i3 * sw3)[None, :]
    o_off = r64 * so0 + (i1.to(tl.int64) * so1 + i2 * so2 + i3 * so3)[None, :]
    w = tl.load(w_ptr + w_off, mask=mask, other=0.0).to(tl.float32)  # [BR, BC]
    offset = tl.load(offset_ptr)
    z = normal_tile(seed_lo, seed_hi, offset, stream, pid_r * BR, pid_c * BC, BR, BC)
    if SIGMA_BY_COL:  # a bias seen as one row: its sigma is that of its channel (= column)
        s = noise_scale(w, sigma_ptr, cols[None, :], cmask[None, :], MODE)
    else:
        s = noise_scale(w, sigma_ptr, rows[:, None], rmask[:, None], MODE)
    tl.store(out_ptr + o_off, (w + s * z).to(out_ptr.dtype.element_ty), mask=mask)


def _dims4(t: torch.Tensor):
    shape = list(t.shape) + [1] * (4 - t.dim())
    strides = list(t.stride()) + [0] * (4 - t.dim())
    return shape, strides


def _launch(src, out, sigma, mode, seed, offset, stream, rows, sigma_by_col):
    shape, sw = _dims4(src)
    _, so = _dims4(out)
    if rows == 1 and src.dim() == 1:  # a bias: one row of len(bias) columns
        shape, sw, so = [1, shape[0], 1, 1], [0, sw[0], 0, 0], [0, so[0], 0, 0]
    R, D1, D2, D3 = shape
    C = D1 * D2 * D3
    if R == 0 or C == 0:
        return out
    grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _noisy_weight_kernel[grid](
        src, out, sigma, offset, seed & 0xFFFFFFFF, seed >> 32, stream,
        R, C, D2, D3, *sw, *so,
        MODE=mode, SIGMA_BY_COL=sigma_by_col, BR=BLOCK_R, BC=BLOCK_C,
    )
    return out


def noisy_weight(weight: torch.Tensor, sigma: torch.Tensor, mode: int, seed: int,
                 offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W + sigma z`` (stream 0) as a new tensor of ``dtype`` in ``weight``'s memory format."""
    assert weight.dim() in (2, 4), weight.shape
    out = torch.empty_like(weight, dtype=dtype)
    offset = offset.to(weight.device)
    return _launch(weight, out, sigma, mode, seed, offset, 0, weight.shape[0], False)


def noisy_bias(bias: torch.Tensor, sigma: torch.Tensor, mode: int, seed: int,
               offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``b + sigma z_b`` (stream 1, row 0; sigma of each bias element = its channel's)."""
    out = torch.empty_like(bias, dtype=dtype)
    offset = offset.to(bias.device)
    return _launch(bias, out, sigma, mode, seed, offset, 1, 1, True)
