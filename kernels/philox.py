"""The noise contract of :mod:`fastnoise.rng` in Triton.

``normal_tile`` draws z for a ``[BR, BC]`` tile whose first column is a multiple of 8 (one
Philox call per 8 columns, interleaved back); ``normal_at`` draws z for arbitrary
``(row, col)`` element indices (one Philox call per element, word and lane picked by
``col % 8``), for kernels whose K order is not the canonical one (implicit-GEMM convs).

Box-Muller without a general sin/cos: the angle ``theta = 2 pi b`` of a 16-bit ``b`` is
``(pi / 2) * (q + f)`` with the quadrant ``q = b >> 14`` and ``f`` in (0, 1) from the low 14
bits, so ``theta = q pi/2 + pi/4 + p`` with ``p`` in (-pi/4, pi/4). cos p and sin p come from
their Taylor polynomials to degree 8 and 9 (truncation below 3e-8 and 2e-9 on that interval),
the pi/4 and the quadrant are a rotation: a scale, a swap and two sign flips. Branch-free, the
same operations under the interpreter, and float32-exact to ~1e-7.
"""

import triton
import triton.language as tl

# a constexpr: compiled Triton refuses plain module globals inside @jit functions
PHILOX_ROUNDS = tl.constexpr(10)  # must equal fastnoise.rng.PHILOX_ROUNDS
# The 8 of `// 8` and `% 8` below is fastnoise.rng.NORMALS_PER_CALL, written as a literal: the
# interpreter turns `int // constexpr` into a constexpr that tensors do not add to. The kernel
# tests compare every kernel's z with rng.normal_grid, so the two cannot drift apart.


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
def _box_muller(x):
    """One Philox word (uint32) -> (rho cos theta, rho sin theta), float32."""
    a = ((x & 0xFFFF).to(tl.float32) + 0.5) * 1.52587890625e-05  # (h + 1/2) * 2**-16
    rho = tl.sqrt(-2.0 * tl.log(a))
    b = x >> 16
    q = b >> 14  # quadrant of theta
    p = (((b & 0x3FFF).to(tl.float32) + 0.5) * 6.103515625e-05 - 0.5) * 1.5707963267948966
    p2 = p * p
    sin_p = p * (1.0 + p2 * (-1.6666666666666666e-01 + p2 * (8.3333333333333332e-03 + p2 * (
        -1.9841269841269841e-04 + p2 * 2.7557319223985893e-06))))
    cos_p = 1.0 + p2 * (-0.5 + p2 * (4.1666666666666664e-02 + p2 * (
        -1.3888888888888889e-03 + p2 * 2.4801587301587302e-05)))
    r = rho * 0.7071067811865476
    c = r * (cos_p - sin_p)  # rho cos(pi/4 + p)
    s = r * (cos_p + sin_p)  # rho sin(pi/4 + p)
    # rotate by q * pi/2: (c, s) -> (c, s), (-s, c), (-c, -s), (s, -c)
    odd = (q & 1) == 1
    c_rot = tl.where(odd, s, c)
    s_rot = tl.where(odd, c, s)
    return (tl.where((q == 1) | (q == 2), -c_rot, c_rot),
            tl.where(q >= 2, -s_rot, s_rot))


@triton.jit
def _key(seed_lo, seed_hi):
    return seed_lo.to(tl.uint32), seed_hi.to(tl.uint32)


@triton.jit
def normal_tile(seed_lo, seed_hi, offset, stream, row0, col0, BR: tl.constexpr, BC: tl.constexpr):
    """z for rows ``row0 + [0, BR)`` x columns ``col0 + [0, BC)``; ``col0 % 8 == 0``, ``BC % 8 == 0``.

    Returns float32 ``[BR, BC]``. Out-of-range rows/columns get values too; mask them on store.
    """
    k0, k1 = _key(seed_lo, seed_hi)
    G: tl.constexpr = BC // 8
    rows = (row0 + tl.arange(0, BR)).to(tl.uint32)  # [BR]
    groups = (col0 // 8 + tl.arange(0, G)).to(tl.uint32)  # [G]
    c0 = groups[None, :] + tl.zeros((BR, G), tl.uint32)  # [BR, G]
    c1 = rows[:, None] + tl.zeros((BR, G), tl.uint32)
    c2 = (tl.zeros((BR, G), tl.uint32) + stream).to(tl.uint32)
    c3 = (tl.zeros((BR, G), tl.uint32) + offset).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, k0, k1, PHILOX_ROUNDS)
    cos0, sin0 = _box_muller(x0)
    cos1, sin1 = _box_muller(x1)
    cos2, sin2 = _box_muller(x2)
    cos3, sin3 = _box_muller(x3)
    # back into column order [cos0, sin0, cos1, sin1, cos2, sin2, cos3, sin3] per group: each
    # interleave puts its operands at the even / odd positions of the next bit
    cos = tl.interleave(tl.interleave(cos0, cos2), tl.interleave(cos1, cos3))  # [BR, BC/2]
    sin = tl.interleave(tl.interleave(sin0, sin2), tl.interleave(sin1, sin3))
    return tl.interleave(cos, sin)  # [BR, BC]


@triton.jit
def normal_at(seed_lo, seed_hi, offset, stream, rows, cols):
    """z at element indices ``(rows, cols)`` (broadcast-compatible int tensors), float32."""
    k0, k1 = _key(seed_lo, seed_hi)
    zero = tl.zeros_like(rows + cols).to(tl.uint32)
    c0 = (cols // 8).to(tl.uint32) + zero
    c1 = rows.to(tl.uint32) + zero
    c2 = (zero + stream).to(tl.uint32)
    c3 = (zero + offset).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, k0, k1, PHILOX_ROUNDS)
    lane = (cols % 8) + zero.to(cols.dtype)
    word = lane // 2
    # Box-Muller on the word the lane needs only
    x = tl.where(word < 2, tl.where(word == 0, x0, x1), tl.where(word == 2, x2, x3))
    cos, sin = _box_muller(x)
    return tl.where(lane % 2 == 0, cos, sin)


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
