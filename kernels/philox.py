"""The noise contract of :mod:`fastnoise.rng` in Triton.

``normal_tile`` draws z for a ``[BR, BC]`` tile whose first column is a multiple of 4 (one
Philox call per 4 columns, interleaved back); ``normal_at`` draws z for arbitrary
``(row, col)`` element indices (one Philox call per element, lane picked by ``col % 4``), for
kernels whose K order is not the canonical one (implicit-GEMM convs).
"""

import triton
import triton.language as tl

# a constexpr: compiled Triton refuses plain module globals inside @jit functions
PHILOX_ROUNDS = tl.constexpr(10)  # must equal fastnoise.rng.PHILOX_ROUNDS


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1, N_ROUNDS: tl.constexpr):
    """Philox4x32-N on uint32 tensors; returns the four output words."""
    m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    for _ in tl.static_range(N_ROUNDS):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(m1, a2) ^ c1 ^ k0
        c2 = tl.umulhi(m0, a0) ^ c3 ^ k1
        c1 = m1 * a2
        c3 = m0 * a0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _uniform(x):
    # (0, 1), exactly representable in float32: ((x >> 9) * 2 + 1) * 2**-24
    return ((x >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08


@triton.jit
def _box_muller(xa, xb):
    rho = tl.sqrt(-2.0 * tl.log(_uniform(xa)))
    theta = 6.283185307179586 * _uniform(xb)
    return rho * tl.cos(theta), rho * tl.sin(theta)


@triton.jit
def _key(seed_lo, seed_hi):
    return seed_lo.to(tl.uint32), seed_hi.to(tl.uint32)


@triton.jit
def normal_tile(seed_lo, seed_hi, offset, stream, row0, col0, BR: tl.constexpr, BC: tl.constexpr):
    """z for rows ``row0 + [0, BR)`` x columns ``col0 + [0, BC)``; ``col0 % 4 == 0``, ``BC % 4 == 0``.

    Returns float32 ``[BR, BC]``. Out-of-range rows/columns get values too; mask them on store.
    """
    k0, k1 = _key(seed_lo, seed_hi)
    rows = (row0 + tl.arange(0, BR)).to(tl.uint32)  # [BR]
    groups = (col0 // 4 + tl.arange(0, BC // 4)).to(tl.uint32)  # [BC/4]
    c0 = groups[None, :] + tl.zeros((BR, BC // 4), tl.uint32)  # [BR, BC/4]
    c1 = rows[:, None] + tl.zeros((BR, BC // 4), tl.uint32)
    c2 = (tl.zeros((BR, BC // 4), tl.uint32) + stream).to(tl.uint32)
    c3 = (tl.zeros((BR, BC // 4), tl.uint32) + offset).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, k0, k1, PHILOX_ROUNDS)
    n0, n1 = _box_muller(x0, x1)
    n2, n3 = _box_muller(x2, x3)
    # lanes back into column order: [n0, n1, n2, n3] per group
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))  # [BR, BC]


@triton.jit
def normal_at(seed_lo, seed_hi, offset, stream, rows, cols):
    """z at element indices ``(rows, cols)`` (broadcast-compatible int tensors), float32."""
    k0, k1 = _key(seed_lo, seed_hi)
    zero = tl.zeros_like(rows + cols).to(tl.uint32)
    c0 = (cols // 4).to(tl.uint32) + zero
    c1 = rows.to(tl.uint32) + zero
    c2 = (zero + stream).to(tl.uint32)
    c3 = (zero + offset).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, k0, k1, PHILOX_ROUNDS)
    lane = (cols % 4) + zero.to(cols.dtype)
    # Box-Muller on the pair the lane needs only
    xa = tl.where(lane < 2, x0, x2)
    xb = tl.where(lane < 2, x1, x3)
    rho = tl.sqrt(-2.0 * tl.log(_uniform(xa)))
    theta = 6.283185307179586 * _uniform(xb)
    return rho * tl.where(lane % 2 == 0, tl.cos(theta), tl.sin(theta))


@triton.jit
def noise_scale(w, sigma_ptr, channels, channel_mask, MODE: tl.constexpr):
    """sigma per element for weight values ``w`` (float32) of output channels ``channels``.

    MODE 0: one sigma; 1: sigma per output channel; 2: sigma[0] * |w| (proportional).
    """
    if MODE == 0:
        return tl.load(sigma_ptr) + tl.zeros_like(w)
    elif MODE == 1:
        return tl.load(sigma_ptr + channels, mask=channel_mask, other=0.0) + tl.zeros_like(w)
    else:
        return tl.load(sigma_ptr) * tl.abs(w)
