"""Noisy conv2d as an implicit GEMM that adds ``sigma * z`` to each weight tile in-kernel.

For input ``x [N, C, H, W]`` (any strides: NCHW or channels_last), weight
``W [Cout, C/g, KH, KW]`` and ``g`` groups, group ``j`` computes the GEMM

    y[m, co] = sum_k  X_j[m, k] * (W[co, k] + sigma(co, k) * z[co, k]) + b[co]

with ``m = (n, oh, ow)`` an output pixel (``M = N * OH * OW`` rows), ``co`` one of the group's
``Cout/g`` output channels and ``k`` one of its ``K = C/g * KH * KW`` taps;
``X_j[m, k] = x[n, j*C/g + ci, oh*sh - ph + r*dh, ow*sw - pw + s*dw]`` (zero outside the
image). ``z[co, k]`` is the contract's noise (:mod:`fastnoise.rng`) of row ``co`` and canonical
column ``k = ci * KH * KW + r * KW + s`` of the weight's GEMM view ``[Cout, K]``; the noisy
weight is rounded once to the compute dtype (that of ``x``), as the reference does.

The K loop runs over canonical columns, ``BK`` at a time, so a weight tile's noise is one
``normal_tile`` (one Philox call per 8 weights); each column is decomposed into ``(ci, r, s)``
to gather the input tile element by element. An ``(r, s, ci-block)`` order would read NHWC
inputs in contiguous channel runs, but its canonical columns are ``KH * KW`` apart, so its noise
would need ``normal_at`` per element: 8x the Philox calls, and RNG, not memory, is what this path pays
for. Every M-tile redraws the noise of the weight tiles it reads, ``ceil(M / BM) * |W|`` normals
in all, so this path is for small outputs (batch 1-8, late ResNet stages), where the input is
small and L2-resident and the per-element gather is cheap; large outputs generate
``W + sigma z`` once and call cuDNN (:mod:`fastnoise.kernels.noise_gen`). When the output has
too few tiles to fill the GPU, the K loop is split over ``SPLIT_K`` programs that add float32
partial sums atomically.

Depthwise-like convs (one input channel per group) take a separate direct kernel: a
``[BM, BC]`` tile of output pixels x channels, ``KH * KW`` multiply-adds per element.

Only the forward lives here: the backward of every path regenerates ``W + sigma z`` once and
calls ``aten.convolution_backward`` (see :mod:`fastnoise._backends_conv`).
"""

import functools

import torch
import triton
import triton.language as tl

from fastnoise._backends_base import conv_output_memory_format
from fastnoise.dispatch import triton_interpret

from .philox import noise_scale, normal_at, normal_tile

__all__ = ["noisy_conv2d_fwd"]




@triton.jit
def _round(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """float32 -> ``dtype`` rounded to nearest even, as the GPU converts.

    The interpreter truncates float32 -> bfloat16; with ``EMULATE_RTNE`` the rounding is done
    on the bits first (add half an ulp of bfloat16, plus one if the kept lsb is odd).
    """
    if EMULATE_RTNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# Tile configs: a starting set for H100-class GPUs, to be pruned by `bench/test_bench_conv.py`.
# Chosen so that ptxas (sm_90, Triton 3.8; tests/test_kernels_compile.py -s) spills in none of
# them in 16-bit and under autocast: the gather's int64 offsets and masks ([BM, BK] per step)
# fill the registers, so every tile above 16x64x32 gets 8 warps (with 4 warps, 64x64x64,
# 128x64x32 and 128x128x32 spilled 98-215 registers). Under the interpreter (CPU tests) one
# small config, so nothing is autotuned there.
_CONFIGS = [
    triton.Config({"BM": 16, "BN": 64, "BK": 32}, num_warps=4, num_stages=4),
    triton.Config({"BM": 16, "BN": 128, "BK": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 32, "BN": 64, "BK": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 32, "BN": 128, "BK": 32}, num_warps=8, num_stages=4),
    triton.Config({"BM": 64, "BN": 64, "BK": 32}, num_warps=8, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 32}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 64, "BK": 32}, num_warps=8, num_stages=3),
]
_INTERPRET_CONFIGS = [triton.Config({"BM": 32, "BN": 16, "BK": 16}, num_warps=4, num_stages=1)]


def _prune(configs, named_args, **kwargs):
    """Small outputs: no tile taller than the output (it would only compute padding)."""
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BM"] <= max(16, m)]
    return kept or configs[:1]

# Split-K is sized from an estimate of the output tiles at this tile size (the real BM/BN are
# autotuned); the goal is about two programs per SM.
_SPLIT_EST_BM = 64
_SPLIT_EST_BN = 64
_MAX_SPLIT_K = 16


@triton.autotune(
    configs=_INTERPRET_CONFIGS if triton_interpret() else _CONFIGS,
    key=["M_BUCKET", "COUT_G", "CIN_G", "KH", "KW", "ATOMIC"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["y_ptr"],  # split-K adds into y: keep autotuning runs from accumulating
)
@triton.jit
def _noisy_conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, sigma_ptr, offset_ptr, seed_lo, seed_hi,
    M, M_BUCKET, H, W, OH, OW, CIN_G, COUT_G, SPLIT_K,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    NOISE_BIAS: tl.constexpr, ATOMIC: tl.constexpr, INTERPRET: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One [BM, BN] tile of y for group program_id(1), K tiles program_id(2)::SPLIT_K.

    ``ATOMIC`` (``SPLIT_K > 1``): y is a zeroed float32 buffer that the splits add into.
    ``M_BUCKET`` (next power of two of M) only keys the autotuning.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_tiles = tl.cdiv(COUT_G, BN)
    pid_m = pid // n_tiles  # neighbouring programs share the x tile
    pid_n = pid % n_tiles

    offs_m = pid_m * BM + tl.arange(0, BM)  # [BM] output pixels
    mmask = offs_m < M
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n = (t // OH).to(tl.int64)
    ih0 = oh * stride_h - pad_h  # [BM]
    iw0 = ow * stride_w - pad_w
    x_row = n * sxn + (g * CIN_G).to(tl.int64) * sxc  # [BM] int64
    K = CIN_G * KH * KW

    co_local = pid_n * BN + tl.arange(0, BN)  # [BN]
    nmask = co_local < COUT_G
    co = g * COUT_G + co_local  # global output channel = row of the weight's GEMM view
    w_col = co.to(tl.int64) * swo  # [BN]

    offset = tl.load(offset_ptr)
    compute_ty = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(pid_k * BK, K, SPLIT_K * BK):
        k = k0 + tl.arange(0, BK)  # [BK] canonical columns k = ci * KH * KW + r * KW + s
        kmask = k < K
        ci = k // (KH * KW)
        tap = k % (KH * KW)
        r = tap // KW
        s = tap % KW
        ih = ih0[:, None] + (r * dil_h)[None, :]  # [BM, BK]
        iw = iw0[:, None] + (s * dil_w)[None, :]
        inside = (mmask[:, None] & kmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
        x_off = x_row[:, None] + ci.to(tl.int64)[None, :] * sxc + ih.to(tl.int64) * sxh \
            + iw.to(tl.int64) * sxw
        xt = tl.load(x_ptr + x_off, mask=inside, other=0.0)  # [BM, BK]

        wmask = kmask[:, None] & nmask[None, :]
        w_off = (ci.to(tl.int64) * swi + r * swh + s * sww)[:, None] + w_col[None, :]
        w = tl.load(w_ptr + w_off, mask=wmask, other=0.0).to(tl.float32)  # [BK, BN]
        z = tl.trans(normal_tile(seed_lo, seed_hi, offset, 0, g * COUT_G + pid_n * BN, k0,
                                 BN, BK))  # [BK, BN]: rows co, canonical columns k
        sig = noise_scale(w, sigma_ptr, co[None, :], nmask[None, :], MODE)
        wn = _round(tl.where(wmask, w + sig * z, 0.0), compute_ty, INTERPRET)  # rounded once

        if INTERPRET:  # the interpreter's dot cannot take bfloat16 operands; exact upcast
            acc = tl.dot(xt.to(tl.float32), wn.to(tl.float32), acc)
        elif compute_ty == tl.float32:
            acc = tl.dot(xt, wn, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wn, acc)

    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=nmask, other=0.0).to(tl.float32)  # [BN]
        if NOISE_BIAS:  # stream 1, row 0, column = channel; sigma of that channel
            zb = normal_at(seed_lo, seed_hi, offset, 1, tl.zeros_like(co), co)
            bias = bias + noise_scale(bias, sigma_ptr, co, nmask, MODE) * zb
        bias = _round(bias, compute_ty, INTERPRET).to(tl.float32)
        if ATOMIC:
            bias = tl.where(pid_k == 0, bias, 0.0)
        acc += bias[None, :]

    y_off = (n * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] \
        + co.to(tl.int64)[None, :] * syc  # [BM, BN]
    ymask = mmask[:, None] & nmask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptr + y_off, acc, mask=ymask)
    else:
        tl.store(y_ptr + y_off, _round(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ymask)


@triton.jit
def _noisy_dwconv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, sigma_ptr, offset_ptr, seed_lo, seed_hi,
    M, H, W, OH, OW, COUT, COUT_G,
    sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    NOISE_BIAS: tl.constexpr, INTERPRET: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):
    """One input channel per group: y[m, co] = sum_{r,s} x[m @ (r, s), co // COUT_G] * Wn[co, 0, r, s]."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)  # [BM]
    mmask = offs_m < M
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n = (t // OH).to(tl.int64)
    co = pid_c * BC + tl.arange(0, BC)  # [BC]
    cmask = co < COUT
    x_chan = (co // COUT_G).to(tl.int64) * sxc  # [BC]
    offset = tl.load(offset_ptr)
    compute_ty = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for tap in tl.static_range(KH * KW):
        r = tap // KW
        s = tap % KW
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        inside = mmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # [BM]
        x_off = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw  # [BM]
        xt = tl.load(x_ptr + x_off[:, None] + x_chan[None, :],
                     mask=inside[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # [BM, BC]
        w = tl.load(w_ptr + co.to(tl.int64) * swo + (r * swh + s * sww), mask=cmask,
                    other=0.0).to(tl.float32)  # [BC]
        z = normal_at(seed_lo, seed_hi, offset, 0, co, tl.zeros_like(co) + tap)  # column = tap
        wn = _round(w + noise_scale(w, sigma_ptr, co, cmask, MODE) * z, compute_ty, INTERPRET)
        wn = wn.to(tl.float32)
        acc += xt * wn[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=cmask, other=0.0).to(tl.float32)
        if NOISE_BIAS:
            zb = normal_at(seed_lo, seed_hi, offset, 1, tl.zeros_like(co), co)
            bias = bias + noise_scale(bias, sigma_ptr, co, cmask, MODE) * zb
        acc += _round(bias, compute_ty, INTERPRET).to(tl.float32)[None, :]
    y_off = (n * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] \
        + co.to(tl.int64)[None, :] * syc
    tl.store(y_ptr + y_off, _round(acc, y_ptr.dtype.element_ty, INTERPRET),
             mask=mmask[:, None] & cmask[None, :])


_DW_BM = 32  # 32 x 32 with 4 warps: no spills in any dtype (64 x 32 spilled ~20)
_DW_BC = 32


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, so CPU tests exercise split-K too


def _pick_split_k(m: int, cout_g: int, groups: int, steps: int, device: torch.device) -> int:
    """K splits so that output tiles x splits is about two programs per SM."""
    tiles = triton.cdiv(m, _SPLIT_EST_BM) * triton.cdiv(cout_g, _SPLIT_EST_BN) * groups
    want = triton.cdiv(2 * _sm_count(device), tiles)
    return max(1, min(want, steps // 4 if steps >= 8 else 1, _MAX_SPLIT_K))


def noisy_conv2d_fwd(x: torch.Tensor, weight: torch.Tensor, bias, sigma: torch.Tensor, mode: int,
                     noise_bias: bool, seed: int, offset: torch.Tensor, stride, padding, dilation,
                     groups: int, split_k: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, W + sigma z, b)`` with the noise drawn in-kernel; output in ``x.dtype``.

    Args as :func:`fastnoise.reference.conv2d_forward` (``x`` already in the compute dtype,
    ``padding`` explicit ints). ``split_k`` overrides the K-split heuristic (tests). The output
    layout is :func:`fastnoise._backends_conv.conv_output_memory_format`'s; ``out`` (any
    strides) receives the result instead when given.
    """
    assert x.dim() == 4 and weight.dim() == 4, (x.shape, weight.shape)
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    n, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    assert c == cin_g * groups and cout % groups == 0, (x.shape, weight.shape, groups)
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cout_g = cout // groups
    m = n * oh * ow
    fmt = conv_output_memory_format(x, weight)
    if out is None:
        y = torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    else:
        assert out.shape == (n, cout, oh, ow) and out.dtype == x.dtype, (out.shape, out.dtype)
        y = out
    if y.numel() == 0:
        return y
    offset = offset.to(x.device)
    has_bias = bias is not None
    b = bias if has_bias else sigma  # any valid pointer when there is no bias
    seed_lo, seed_hi = seed & 0xFFFFFFFF, seed >> 32
    geometry = (sh, sw, ph, pw, dh, dw)

    if cin_g == 1:
        grid = (triton.cdiv(m, _DW_BM), triton.cdiv(cout, _DW_BC))
        _noisy_dwconv_fwd_kernel[grid](
            x, weight, b, y, sigma, offset, seed_lo, seed_hi,
            m, h, w, oh, ow, cout, cout_g,
            *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *y.stride(),
            *geometry,
            KH=kh, KW=kw, MODE=mode, HAS_BIAS=has_bias, NOISE_BIAS=bool(noise_bias and has_bias),
            INTERPRET=triton_interpret(), BM=_DW_BM, BC=_DW_BC,
        )
        return y

    if split_k is None:
        split_k = _pick_split_k(m, cout_g, groups, triton.cdiv(cin_g * kh * kw, 32), x.device)
    assert split_k >= 1, split_k
    acc = y if split_k == 1 else torch.zeros_like(y, dtype=torch.float32)  # same layout as y
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(cout_g, meta["BN"]), groups, split_k)
    _noisy_conv_fwd_kernel[grid](
        x, weight, b, acc, sigma, offset, seed_lo, seed_hi,
        m, triton.next_power_of_2(m), h, w, oh, ow, cin_g, cout_g, split_k,
        *x.stride(), *weight.stride(), *acc.stride(),
        *geometry,
        KH=kh, KW=kw, MODE=mode, HAS_BIAS=has_bias, NOISE_BIAS=bool(noise_bias and has_bias),
        ATOMIC=split_k > 1, INTERPRET=triton_interpret(),
    )
    if acc is not y:
        y.copy_(acc)
    return y
