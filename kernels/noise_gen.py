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
def _noisy_tile(src, dst, sigma_ptr, seed_lo, seed_hi, offset, stream, pid_r, pid_c,
                R, C, D2, D3, sw0, sw1, sw2, sw3, so0, so1, so2, so3, by_col,
                MODE: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Tile ``(pid_r, pid_c)`` of ``dst = src + sigma z``, the source seen as ``[R, D1, D2, D3]``
    with ``C = D1 * D2 * D3`` canonical columns, read and written through strides. ``by_col``:
    sigma is indexed by column (a bias seen as one row: each element has its channel's sigma).
    """
    rows = pid_r * BR + tl.arange(0, BR)  # [BR]
    cols = pid_c * BC + tl.arange(0, BC)  # [BC]
    rmask = rows < R
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    # canonical column -> (i1, i2, i3)
    i3 = cols % D3
    t = cols // D3
    i2 = t % D2
    i1 = t // D2
    r64 = rows.to(tl.int64)[:, None]
    w_off = r64 * sw0 + (i1.to(tl.int64) * sw1 + i2 * sw2 + i3 * sw3)[None, :]
    o_off = r64 * so0 + (i1.to(tl.int64) * so1 + i2 * so2 + i3 * so3)[None, :]
    w = tl.load(src + w_off, mask=mask, other=0.0).to(tl.float32)  # [BR, BC]
    z = normal_tile(seed_lo, seed_hi, offset, stream, pid_r * BR, pid_c * BC, BR, BC)
    chan = tl.where(by_col, cols[None, :], rows[:, None])  # [BR, BC]
    chan_mask = tl.where(by_col, cmask[None, :], rmask[:, None])
    s = noise_scale(w, sigma_ptr, chan, chan_mask, MODE)
    tl.store(dst + o_off, (w + s * z).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _noisy_weight_kernel(
    w_ptr, out_ptr, sigma_ptr, offset_ptr, seed_lo, seed_hi, stream,
    R, C, D2, D3,
    sw0, sw1, sw2, sw3, so0, so1, so2, so3,
    MODE: tl.constexpr, SIGMA_BY_COL: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):
    offset = tl.load(offset_ptr)
    _noisy_tile(w_ptr, out_ptr, sigma_ptr, seed_lo, seed_hi, offset, stream,
                tl.program_id(0), tl.program_id(1), R, C, D2, D3, sw0, sw1, sw2, sw3,
                so0, so1, so2, so3, SIGMA_BY_COL, MODE, BR, BC)


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


# ----------------------------------------------------------------------------- many tensors, one launch
# Per-entry metadata: one int64 row of _NF fields (addresses are raw device pointers):
#   0 source address, 1 sigma address, 2 offset address (0: use field 3), 3 inline offset,
#   4 seed low word, 5 seed high word, 6 stream, 7-10 R, C, D2, D3 (source seen as [R, D1, D2, D3],
#   C = D1 * D2 * D3), 11-14 source strides, 15-18 output strides, 19 output base (elements),
#   20 column tiles, 21 sigma by column (a bias).
_NF = 22


@triton.jit
def _noisy_weights_multi_kernel(
    meta_ptr, tile_start_ptr, out_ptr, L,
    SRC_TY: tl.constexpr, MODE: tl.constexpr, LOG_L: tl.constexpr, NF: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr,
):
    """Program ``pid`` writes tile ``pid - tile_start[e]`` of entry ``e``, the last entry whose
    ``tile_start <= pid`` (found by bisection); the tile math is ``_noisy_tile``, shared with
    ``_noisy_weight_kernel``.
    """
    pid = tl.program_id(0)
    e = 0
    for i in tl.static_range(LOG_L):  # largest e with tile_start[e] <= pid
        cand = e + (1 << (LOG_L - 1 - i))
        start = tl.load(tile_start_ptr + cand, mask=cand < L, other=2**62)
        e = tl.where(start <= pid, cand, e)
    row = meta_ptr + e * NF
    src = tl.load(row + 0).to(tl.pointer_type(SRC_TY))
    sigma_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    offset_addr = tl.load(row + 2)
    offset = tl.load(offset_addr.to(tl.pointer_type(tl.int64)), mask=offset_addr != 0,
                     other=tl.load(row + 3))  # a device counter, or a value given inline
    seed_lo = tl.load(row + 4)
    seed_hi = tl.load(row + 5)
    stream = tl.load(row + 6)
    R = tl.load(row + 7)
    C = tl.load(row + 8)
    D2 = tl.load(row + 9)
    D3 = tl.load(row + 10)
    local = pid - tl.load(tile_start_ptr + e)
    tiles_c = tl.load(row + 20)
    _noisy_tile(src, out_ptr + tl.load(row + 19), sigma_ptr, seed_lo, seed_hi, offset, stream,
                local // tiles_c, local % tiles_c, R, C, D2, D3,
                tl.load(row + 11), tl.load(row + 12), tl.load(row + 13), tl.load(row + 14),
                tl.load(row + 15), tl.load(row + 16), tl.load(row + 17), tl.load(row + 18),
                tl.load(row + 21) != 0, MODE, BR, BC)


_empty = torch.empty  # the flat output's allocator (tests pre-fill it with NaN)
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def noisy_weights_multi(tensors, sigmas, modes, seeds, offsets, dtype: torch.dtype,
                        streams=None) -> list[torch.Tensor]:
    """``t + sigma z`` for many tensors at once: one launch per (source dtype, mode) group.

    Entry ``i`` is exactly what :func:`noisy_weight` (``streams[i] == 0``, the default; 2-D or
    4-D, keeping its memory format) or :func:`noisy_bias` (``streams[i] == 1``; 1-D) returns
    for ``(tensors[i], sigmas[i], modes[i], seeds[i], offsets[i], dtype)``. ``offsets[i]`` is a
    one-element int64 tensor on the device (read there, no sync) or an int. The results are
    views into one flat buffer per group.
    """
    count = len(tensors)
    streams = [0] * count if streams is None else list(streams)
    if not all(len(v) == count for v in (sigmas, modes, seeds, offsets, streams)):
        raise ValueError("noisy_weights_multi: tensors, sigmas, modes, seeds, offsets and streams "
                         "must have the same length")
    if dtype not in _TL_DTYPES:
        raise TypeError(f"noisy_weights_multi: dtype must be float16, bfloat16 or float32, got {dtype}")
    results: list = [None] * count
    groups: dict = {}
    for i, t in enumerate(tensors):
        if t.dtype not in _TL_DTYPES:
            raise TypeError(f"noisy_weights_multi: tensor {i} has dtype {t.dtype}")
        if streams[i] == 1:
            assert t.dim() == 1, t.shape
        else:
            assert t.dim() in (2, 4), t.shape
        groups.setdefault((t.dtype, int(modes[i])), []).append(i)
    for (src_dtype, mode), idx in groups.items():
        for i, v in zip(idx, _launch_group([tensors[i] for i in idx], [sigmas[i] for i in idx],
                                           mode, [seeds[i] for i in idx], [offsets[i] for i in idx],
                                           [streams[i] for i in idx], src_dtype, dtype), strict=True):
            results[i] = v
    return results


def _launch_group(tensors, sigmas, mode, seeds, offsets, streams, src_dtype, dtype):
    device = tensors[0].device
    rows, starts, shapes, total, tiles = [], [], [], 0, 0
    keep = []  # offset tensors moved to the device must outlive the launch
    for t, sigma, seed, offset, stream in zip(tensors, sigmas, seeds, offsets, streams, strict=True):
        assert t.device == device and sigma.device == device and sigma.dtype == torch.float32
        so = torch.empty_like(t, dtype=dtype, device="meta").stride()  # noisy_weight's layout
        shape, sw = _dims4(t)
        so4 = list(so) + [0] * (4 - t.dim())
        if stream == 1:  # a bias: one row of len(bias) columns, sigma by column
            shape, sw, so4 = [1, shape[0], 1, 1], [0, sw[0], 0, 0], [0, so4[0], 0, 0]
        R, D1, D2, D3 = shape
        C = D1 * D2 * D3
        n_tiles = triton.cdiv(R, BLOCK_R) * triton.cdiv(C, BLOCK_C)
        if isinstance(offset, torch.Tensor):
            offset = offset.to(device)
            keep.append(offset)
            off_ptr, off_val = offset.data_ptr(), 0
        else:
            off_ptr, off_val = 0, int(offset) & 0xFFFFFFFF
        rows.append([t.data_ptr(), sigma.data_ptr(), off_ptr, off_val, seed & 0xFFFFFFFF, seed >> 32,
                     stream, R, C, D2, D3, *sw, *so4, total, triton.cdiv(C, BLOCK_C), int(stream == 1)])
        starts.append(tiles)
        shapes.append((tuple(t.shape), so, total))
        total += t.numel()
        tiles += n_tiles
    flat = _empty(total, dtype=dtype, device=device)
    if tiles:
        n = len(rows)
        # one host-to-device copy: the metadata rows, then the tile starts
        packed = torch.tensor([v for row in rows for v in row] + starts, dtype=torch.int64).to(device)
        meta, tile_start = packed[: n * _NF], packed[n * _NF:]
        _noisy_weights_multi_kernel[(tiles,)](
            meta, tile_start, flat, n,
            SRC_TY=_TL_DTYPES[src_dtype], MODE=mode, LOG_L=max(1, n.bit_length()), NF=_NF,
            BR=BLOCK_R, BC=BLOCK_C,
        )
    del keep
    return [flat.as_strided(shape, stride, base) for shape, stride, base in shapes]
