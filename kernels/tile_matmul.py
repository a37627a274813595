"""The crossbar tile's forward as one Triton kernel: DAC in the prologue, ADC in the epilogue.

What it computes is :func:`fastnoise.reference.tile_linear_forward` (the arithmetic is in
:mod:`fastnoise.tile`): for ``x [M, K]``, ``W [N, K]`` split along K into ``T`` balanced tiles
(tile ``t`` covers columns ``[k_t, k_t + n_t)``, ``n_t = K // T + (t < K % T)``),

    x_q      = round_c(rint(round_c(clip(x, -r_t, r_t) / s_t)) * s_t)     # DAC, s_t = 2 r_t / inp_res
    p_t      = round_c(x_q[:, tile] @ Wn[:, tile]^T)                      # Wn = round_c(W + sigma z)
    p_t      = round_c(p_t + round_c(o_t * round_c(z5[t * M + m, n])))   # output noise, stream 5
    p_t      = round_c(rint(round_c(p_t / max(q_t, tiny))) * q_t)         # ADC step q_t = 2 b_t / out_res
    p_t      = clip(p_t, -b_t, b_t)                                       # ADC bound b_t [N]
    y        = round_c(... round_c(p_0 + p_1) ... + p_{T-1}) + round_c(b + sigma z_b)

``round_c`` rounds to the compute dtype (x's) where the reference's torch ops round, so the
kernel gives the reference's numbers up to the order of the matmul's sums (and, compiled, the
FMA contraction of float32 ``a * b + c``). ``rint`` rounds half to even, as ``torch.round``,
and a quantizer's division is IEEE-rounded as torch's: ``a / b`` is
``float32(float64(a) * (1 / b))`` with ``1 / b`` in float64 from the host (within 2**-52 of
``a / b``, while the quotient of two floats is never nearer than 2**-49 to a float32 rounding
midpoint without being on it, and never on it: so the same float32, for quotients that are
normal floats). ``div_rn`` would call a slow path (a stack frame), in every program.

One program computes a ``[BM, BN]`` block of ``y`` through every crossbar tile: a tile's K
range is walked in ``BK`` blocks from the multiple of 8 at or below ``k_t`` (the noise contract
draws 8 columns per Philox call, :func:`~fastnoise.kernels.philox.normal_tile`), the columns
outside the tile masked; after the tile's last block its partial output goes through the
output noise and the ADC, and is added to ``y``. The ADC writes its gradient mask (one byte per
tile and output: 2 inside the bound, 1 at it, 0 beyond, as :mod:`fastnoise.tile_ops` saves it),
so the backward needs nothing else of the forward.

The weight noise is either drawn here (``NOISE_IN_KERNEL``: the contract's ``z`` of element
``(n, k)`` on stream 0, exactly what :mod:`fastnoise.kernels.noisy_matmul` adds, so every M-tile
draws its own copy: ``cdiv(M, BM) * N * K`` normals) or read from a noisy weight generated once
(:func:`fastnoise.kernels.noise_gen.noisy_weight`, the same numbers); the caller picks, as the
linear layer picks fused or generate. The per-tile tables (``r_t``, ``s_t``, ``b_t``, ``q_t``,
``o_t``) are ``T`` and ``T x N`` values computed on the host side by torch ops in the compute
dtype, with the reference's formulas (``max |W|`` per tile: :func:`fastnoise.reference.tile_wmax`).

float64 is not handled here (the op keeps its torch composition for it).
"""

import math

import torch
import triton
import triton.language as tl

from fastnoise.dispatch import triton_interpret
from fastnoise.reference import tile_wmax

from .noisy_matmul import _dot_ieee, _round_to, _rows_view
from .philox import noise_scale, normal_tile

__all__ = ["tile_matmul_fwd", "tile_tables"]

GROUP_M = 8  # M-tiles that share a band of weight tiles (L2 reuse)
_empty = torch.empty  # the outputs' allocator (tests pre-fill them: an unwritten element fails)
STREAM_WEIGHT, STREAM_BIAS, STREAM_TILE_OUT = 0, 1, 5  # fastnoise.rng / fastnoise.tile


def _configs():
    """Autotune list; ``_prune`` keeps the small tiles when the noise is drawn here (the Philox
    state of a ``[BN, BK]`` noise tile fills the registers, as in noisy_matmul) and the large
    ones when the weight is read generated."""
    if triton_interpret():
        # one config: small blocks, so the tests' small shapes cross block edges in M, N and K
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16}, num_warps=4, num_stages=1)]
    cfg = lambda bm, bn, bk, w, s: triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w,
                                                 num_stages=s)
    # ptxas for sm_90 (Triton 3.8, tests/test_kernels_compile.py -s): none of these spills in
    # 16-bit; 4 warps at 128 x 64 or 64 x 128 and 128 x 128 at 8 warps do (the accumulator, the
    # running sum and the output noise's Philox state of the epilogue are all [BM, BN]).
    return [
        # noise drawn in the kernel (few M-tiles): small output tiles, as noisy_matmul's
        cfg(16, 32, 32, 4, 3),
        cfg(16, 64, 64, 8, 3),
        cfg(32, 64, 64, 4, 3),
        cfg(64, 64, 64, 8, 3),
        # noisy weight read generated (many M-tiles): bigger output tiles
        cfg(64, 128, 64, 8, 3),
        cfg(128, 64, 64, 8, 3),
    ]


def _prune(configs, named_args, **kwargs):
    """Noise in the kernel: BM <= max(16, M) and BN <= 64; read generated: BM >= 64 for large M."""
    bucket = named_args["M_BUCKET"]
    if kwargs.get("NOISE_IN_KERNEL", True):
        keep = [c for c in configs if c.kwargs["BN"] <= 64 and c.kwargs["BM"] <= max(16, bucket)]
    elif bucket <= 64:
        keep = [c for c in configs if c.kwargs["BM"] <= max(16, bucket)]
    else:
        keep = [c for c in configs if c.kwargs["BM"] >= 64]
    return keep or configs[:1]


@triton.jit
def _rint(v):
    """float32 round half to even (``torch.round``): below 2**23, ``|v| + 2**23`` keeps no fraction
    and the FPU's own rounding of that sum is the rounding wanted; above, ``v`` is an integer."""
    a = tl.abs(v)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    return tl.where(v < 0, -r, r)


@triton.jit
def _div(a, inv_b):
    """float32 ``a / b``, IEEE-rounded, from ``inv_b = 1 / b`` in float64 (see the module docstring)."""
    return (a.to(tl.float64) * inv_b).to(tl.float32)


@triton.jit
def _c(v, cdtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """``v`` rounded to the compute dtype and back to float32 (where a torch op would round)."""
    return _round_to(v, cdtype, EMULATE_RTNE).to(tl.float32)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "T", "NOISE_IN_KERNEL", "HAS_BOUND"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _tile_matmul_kernel(
    x_ptr, w_ptr, y_ptr, mask_ptr, bias_ptr, sigma_ptr, offset_ptr,
    r_ptr, step_ptr, inv_step_ptr, bound_ptr, qstep_ptr, inv_qstep_ptr, onoise_ptr,
    seed_lo, seed_hi,
    M, N, K, T, T_BASE, T_EXTRA, M_BUCKET,
    s_xb, s_xt, s_xk, X_T, s_wn, s_wk, s_ym, s_yn,
    MODE: tl.constexpr, NOISE_IN_KERNEL: tl.constexpr, HAS_RANGE: tl.constexpr,
    HAS_DAC: tl.constexpr, HAS_BOUND: tl.constexpr, HAS_QUANT: tl.constexpr,
    HAS_ONOISE: tl.constexpr, HAS_BIAS: tl.constexpr, NOISE_BIAS: tl.constexpr,
    DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr, EMULATE_RTNE: tl.constexpr,
    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``y [M, N]`` (and the ADC masks ``[T, M, N]``) of the tile; see the module docstring.

    Tables (float32 holding compute-dtype values): ``r_ptr``, ``step_ptr`` ``[T]``;
    ``bound_ptr``, ``qstep_ptr``, ``onoise_ptr`` ``[T, N]`` contiguous. Row ``m`` of x is at
    ``(m // X_T) * s_xb + (m % X_T) * s_xt`` (noisy_matmul's row view: no copy of a 3-D input).
    """
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP * n_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offset = tl.load(offset_ptr)  # call counter, read on the device (no host sync)
    cdtype = x_ptr.dtype.element_ty  # compute dtype

    m = pid_m * BM + tl.arange(0, BM)  # [BM]
    n = pid_n * BN + tl.arange(0, BN)  # [BN]
    m_mask = m < M
    n_mask = n < N
    m64 = m.to(tl.int64)
    n64 = n.to(tl.int64)
    # int32 division (M < 2**31): a 64-bit one is a subroutine call whose frame ptxas counts as spills
    x_row = (m // X_T).to(tl.int64) * s_xb + (m % X_T).to(tl.int64) * s_xt  # [BM]
    out_mask = m_mask[:, None] & n_mask[None, :]

    y = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, T):
        k_lo = t * T_BASE + tl.minimum(t, T_EXTRA)  # the tile's columns [k_lo, k_hi)
        k_hi = k_lo + T_BASE + tl.where(t < T_EXTRA, 1, 0)
        if HAS_RANGE:
            r = tl.load(r_ptr + t)
        if HAS_DAC:
            step = tl.load(step_ptr + t)
            inv_step = tl.load(inv_step_ptr + t)  # float64
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range((k_lo // 8) * 8, k_hi, BK):  # from a multiple of 8: normal_tile's rule
            k = k0 + tl.arange(0, BK)  # [BK]
            k_mask = (k >= k_lo) & (k < k_hi)
            k64 = k.to(tl.int64)
            a = tl.load(x_ptr + x_row[:, None] + k64[None, :] * s_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)  # [BM, BK]
            # prologue: the input clip and the DAC (0 outside the tile stays 0)
            if HAS_RANGE:
                a = tl.minimum(tl.maximum(a, -r), r)
            if HAS_DAC:
                a = _rint(_c(_div(a, inv_step), cdtype, EMULATE_RTNE)) * step
            a = _round_to(a, cdtype, EMULATE_RTNE)
            w_mask = n_mask[:, None] & k_mask[None, :]
            w = tl.load(w_ptr + n64[:, None] * s_wn + k64[None, :] * s_wk, mask=w_mask,
                        other=0.0).to(tl.float32)  # [BN, BK]
            if NOISE_IN_KERNEL:
                z = normal_tile(seed_lo, seed_hi, offset, 0, pid_n * BN, k0, BN, BK)  # [BN, BK]
                s = noise_scale(w, sigma_ptr, n[:, None], n_mask[:, None], MODE)
                w = tl.where(w_mask, w + s * z, 0.0)
            b = tl.trans(_round_to(w, cdtype, EMULATE_RTNE))  # [BK, BN]
            if DOT_UPCAST:
                # the interpreter cannot multiply bfloat16; exact: bf16 products fit in float32
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if DOT_IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)

        # epilogue of tile t: output noise, ADC (quantization, bound, gradient mask), digital sum
        p = _c(acc, cdtype, EMULATE_RTNE)  # [BM, BN]
        if HAS_ONOISE:
            o = tl.load(onoise_ptr + t * N + n, mask=n_mask, other=0.0)  # [BN]
            z5 = normal_tile(seed_lo, seed_hi, offset, 5, t * M + pid_m * BM, pid_n * BN, BM, BN)
            p = _c(p + _c(o[None, :] * _c(z5, cdtype, EMULATE_RTNE), cdtype, EMULATE_RTNE),
                   cdtype, EMULATE_RTNE)
        if HAS_BOUND:
            bd = tl.load(bound_ptr + t * N + n, mask=n_mask, other=0.0)[None, :]  # [1, BN]
            if HAS_QUANT:
                q = tl.load(qstep_ptr + t * N + n, mask=n_mask, other=1.0)[None, :]  # [1, BN]
                inv_q = tl.load(inv_qstep_ptr + t * N + n, mask=n_mask, other=1.0)[None, :]
                v = _rint(_c(_div(p, inv_q), cdtype, EMULATE_RTNE))
                p = _c(v * q, cdtype, EMULATE_RTNE)
            ap = tl.abs(p)
            code = (ap <= bd).to(tl.uint8) + (ap < bd).to(tl.uint8)  # 2 inside, 1 at, 0 beyond
            mrow = (m64 + t * M) * N  # [BM], int64
            tl.store(mask_ptr + mrow[:, None] + n64[None, :], code, mask=out_mask)
            p = tl.minimum(tl.maximum(p, -bd), bd)
        y = _c(y + p, cdtype, EMULATE_RTNE)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]  # [1, BN]
        if NOISE_BIAS:
            # the bias is row 0 of stream 1; its sigma is that of its channel n
            zb = normal_tile(seed_lo, seed_hi, offset, 1, 0, pid_n * BN, 1, BN)  # [1, BN]
            bias = bias + noise_scale(bias, sigma_ptr, n[None, :], n_mask[None, :], MODE) * zb
        y = y + _c(bias, cdtype, EMULATE_RTNE)  # rounded once more by the store, as y + b
    o_ptr = y_ptr + m64[:, None] * s_ym + n64[None, :] * s_yn
    tl.store(o_ptr, _round_to(y, y_ptr.dtype.element_ty, EMULATE_RTNE), mask=out_mask)


# ----------------------------------------------------------------------------- host side
def tile_tables(tile, weight: torch.Tensor, input_range, dtype: torch.dtype, k: int) -> dict:
    """What the kernel reads per call: ``sizes`` (the tile sizes), ``r``, ``step`` ``[T]`` and
    ``bound``, ``qstep``, ``onoise`` ``[T, N]``, float32 holding the compute-dtype values of the
    reference's formulas (:func:`fastnoise.reference._tile_steps`, here for all tiles at once),
    and ``inv_step``, ``inv_qstep``: ``1 / step`` and ``1 / max(qstep, tiny)`` in float64 (the
    divisions). None where the tile has no such stage. ``weight``: the clean ``[N, K]`` weight
    (``max |W|`` per tile)."""
    sizes = tile.sizes(k)
    t, n = len(sizes), weight.shape[0]
    out = dict.fromkeys(("r", "step", "inv_step", "bound", "qstep", "inv_qstep", "onoise"))
    out["sizes"] = sizes
    if not tile.input_range:
        return out
    rd = input_range.detach().to(dtype)  # [T]
    out["r"] = rd.float()
    if tile.inp_res is not None:
        step = (2 * rd) / tile.inp_res
        out["step"], out["inv_step"] = step.float(), 1.0 / step.double()
    need_w = tile.out_bound is not None or tile.out_noise > 0
    wmax = tile_wmax(weight, sizes) if need_w else None  # [T, N], float32
    if tile.out_bound is not None:
        w = wmax if tile.bound_per_channel else wmax.amax(1, keepdim=True)
        bd = ((rd[:, None] * tile.out_bound) * w.to(dtype)).expand(t, n)  # [T, N]
        out["bound"] = bd.float().contiguous()
        if tile.out_res is not None:
            q = (2 * bd) / tile.out_res
            out["qstep"] = q.float().contiguous()
            out["inv_qstep"] = 1.0 / q.clamp_min(torch.finfo(dtype).tiny).double().contiguous()
    if tile.out_noise > 0:
        w = wmax if tile.out_noise_per_channel else wmax.amax(1, keepdim=True)
        on = w.to(dtype) * (tile.out_noise / math.sqrt(t) * rd)[:, None]
        out["onoise"] = on.float().expand(t, n).contiguous()
    return out


def tile_matmul_fwd(x: torch.Tensor, weight: torch.Tensor, bias, input_range, tile,
                    sigma: torch.Tensor, mode: int, noise_bias: bool, seed: int,
                    offset: torch.Tensor, *, weight_noise: bool = True, out_noise: bool = True,
                    noisy_weight=None):
    """The crossbar tile's forward ``(y [M, N], masks [T, M, N] uint8 or None)`` in ``x.dtype``.

    Args:
        x: ``[..., K]`` float16 / bfloat16 / float32 (the compute dtype), any strides; the rows
            are all but the last dimension (``M``).
        weight: the clean ``[N, K]`` weight in any float dtype (``max |W|`` per tile, and the
            weight the noise is added to unless ``noisy_weight`` is given).
        bias: ``[N]`` or None; ``noise_bias``: add ``sigma z_b`` (stream 1) to it.
        input_range: ``[T]`` (None when ``tile.input_range`` is off); tile: a
            :class:`fastnoise.TileSpec`.
        sigma, mode: the weight noise (:meth:`fastnoise.NoiseSpec.sigma`); ``weight_noise``:
            add it at all; seed: int in ``[0, 2**63)``; offset: int64 tensor of one element.
        out_noise: draw the tile's output noise (stream 5) when ``tile.out_noise > 0``.
        noisy_weight: ``W + sigma z`` already generated in ``x.dtype`` (``[N, K]``): read it
            instead of drawing the noise here (``weight_noise`` then only decides the bias's).
    Returns:
        ``y`` with ``x``'s leading dimensions flattened, and the ADC's gradient masks (None
        without an ADC bound).
    """
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the tile kernel computes in float16, bfloat16 or float32, got {x.dtype} "
                        "(float64 takes the torch composition)")
    assert weight.dim() == 2 and sigma.dtype == torch.float32 and offset.dtype == torch.int64
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension must be in_features={K}, got shape {tuple(x.shape)}")
    if noisy_weight is not None and (noisy_weight.shape != weight.shape or noisy_weight.dtype != x.dtype):
        raise ValueError(f"noisy_weight must be {x.dtype} of shape {tuple(weight.shape)}, got "
                         f"{noisy_weight.dtype} {tuple(noisy_weight.shape)}")
    dtype = x.dtype
    tab = tile_tables(tile, weight, input_range, dtype, K)
    sizes = tab["sizes"]
    T = len(sizes)
    if not out_noise:
        tab["onoise"] = None
    av, x_t, s_xb, s_xt, s_xk = _rows_view(x)
    M = x.shape[:-1].numel()
    assert T * max(M, 1) < 2**31, "the output noise's rows (tile * M + m) must fit in 31 bits"
    y = _empty((M, N), dtype=dtype, device=x.device)
    masks = None
    if tab["bound"] is not None:
        masks = _empty((T, M, N), dtype=torch.uint8, device=x.device)
    if M == 0 or N == 0:
        return y, masks
    base, extra = divmod(K, T)
    assert sizes == [base + (i < extra) for i in range(T)], sizes  # the kernel's own split
    offset = offset.to(x.device)
    w = weight if noisy_weight is None else noisy_weight
    dummy = sigma  # never read where its flag is off
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
    _tile_matmul_kernel[grid](
        av, w, y, masks if masks is not None else y, bias if bias is not None else dummy, sigma,
        offset, *(tab[key] if tab[key] is not None else dummy for key in
                  ("r", "step", "inv_step", "bound", "qstep", "inv_qstep", "onoise")),
        seed & 0xFFFFFFFF, seed >> 32,
        M, N, K, T, base, extra, min(triton.next_power_of_2(M), 8192),
        s_xb, s_xt, s_xk, x_t, w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        MODE=mode, NOISE_IN_KERNEL=bool(weight_noise and noisy_weight is None),
        HAS_RANGE=tab["r"] is not None, HAS_DAC=tab["step"] is not None,
        HAS_BOUND=tab["bound"] is not None, HAS_QUANT=tab["qstep"] is not None,
        HAS_ONOISE=tab["onoise"] is not None, HAS_BIAS=bias is not None,
        NOISE_BIAS=bool(weight_noise and noise_bias and bias is not None),
        DOT_IEEE=_dot_ieee(dtype),
        DOT_UPCAST=triton_interpret() and dtype == torch.bfloat16,
        EMULATE_RTNE=triton_interpret() and dtype == torch.bfloat16,
        GROUP=GROUP_M,
    )
    return y, masks
