"""The noise stream: one definition, every backend.

Every kernel and the pure-PyTorch reference draw ``z`` for weight element ``(r, c)`` of the
2-D GEMM view ``[out, K]`` (``K = in * kh * kw`` in PyTorch's contiguous order) like this:

1. Philox4x32-10 (Salmon et al. 2011, Random123) with
   key ``(seed & 0xFFFFFFFF, seed >> 32)`` and counter ``(c // 8, r, stream, offset)``
   gives four 32-bit words ``x0..x3``. ``stream`` is 0 for weights and 1 for the bias
   (the bias is row 0, column ``i``); ``offset`` is the 32-bit call counter.
2. Each word ``x_i`` is split into two 16-bit halves, each a uniform in (0, 1) on the
   midpoints of 2**16 cells: ``a = ((x_i & 0xFFFF) + 1/2) / 2**16`` and
   ``b = ((x_i >> 16) + 1/2) / 2**16``.
3. Box-Muller on the word's pair: ``rho = sqrt(-2 ln a)``, ``theta = 2 pi b`` gives
   ``n_{2i} = rho cos theta`` and ``n_{2i+1} = rho sin theta``.
4. ``z[r, c] = n_{c % 8}``: one Philox call serves eight neighbouring columns.

So ``z`` is a pure function of ``(seed, offset, stream, r, c)``: any tile order, any kernel and
the backward pass regenerate it exactly. Values lie within +-4.855 (``a >= 2**-17``), a tail
of N(0, 1) of probability 1.2e-6 is cut; the statistical tests in ``tests/test_core_rng.py``
hold for this stream.

Why 16-bit uniforms: one Philox call gives eight normals instead of four, and the angle's
quadrant is two bits of ``b``, so kernels compute cos/sin with two short polynomials on
(-pi/4, pi/4) instead of a general sin/cos with range reduction. Compiled for sm_90 this takes
the noise generation from 118 to 47 SASS instructions per normal
(``python bench/rng_cost.py``). Kernels work in float32 and match this float64 reference to
about 1e-6.

Seeds: a weight's ``seed`` is ``mix(global seed, its id)`` and its ``offset`` counts its noisy
uses, so every use sees fresh noise and a run is reproducible from :func:`manual_seed`. The id
follows the model's structure: :func:`fastnoise.convert` sets it from the weight's qualified name
(:func:`key_id`), so copies inside one model differ, a saved and reloaded model (or a fresh one of
the same architecture) draws the same noise, and nothing depends on what else the process built.
:func:`manual_seed` restarts every counter, as ``torch.manual_seed`` restarts dropout.
:func:`fastnoise.noise_state_dict` / :func:`fastnoise.load_noise_state_dict` save and restore the
ids and counters.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading

import torch

__all__ = [
    "PHILOX_ROUNDS",
    "NORMALS_PER_CALL",
    "Z_MAX",
    "philox4x32",
    "normal_grid",
    "manual_seed",
    "initial_seed",
    "mix64",
    "check_seed",
    "key_id",
    "noise_epoch",
    "STREAM_WEIGHT",
    "STREAM_BIAS",
]

PHILOX_ROUNDS = 10
NORMALS_PER_CALL = 8  # neighbouring columns served by one Philox call
Z_MAX = math.sqrt(34 * math.log(2))  # |z| bound: sqrt(-2 ln 2**-17) = 4.8546
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
MAX_SEED = 2**63  # seeds travel through int64 custom-op arguments

STREAM_WEIGHT = 0
STREAM_BIAS = 1


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for int64 tensors a in [0, 2**32) and a constant m.

    int64 cannot hold the 64-bit product, so m is split in 16-bit halves; every partial
    product stays below 2**49.
    """
    p_hi = a * (m >> 16)  # < 2**48
    t = a * (m & 0xFFFF) + ((p_hi & 0xFFFF) << 16)  # < 2**49
    hi = (p_hi >> 16) + (t >> 32)
    return hi, t & MASK32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values; the key is two Python ints.

    Returns four int64 tensors of uint32 values. Matches the Random123 known-answer vectors.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    k0 &= MASK32
    k1 &= MASK32
    for i in range(rounds):
        if i:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _half_uniform(h: torch.Tensor) -> torch.Tensor:
    """16-bit value (in int64) -> float64 uniform in (0, 1): the midpoint of its cell."""
    return (h * 2 + 1).to(torch.float64) * 2.0**-17


def _box_muller(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Philox word -> two normals: radius from the low half, angle from the high half."""
    rho = torch.sqrt(-2.0 * torch.log(_half_uniform(x & 0xFFFF)))
    theta = (2.0 * math.pi) * _half_uniform(x >> 16)
    return rho * torch.cos(theta), rho * torch.sin(theta)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def normal_grid(
    seed: int,
    offset: int,
    rows: int,
    cols: int,
    stream: int = STREAM_WEIGHT,
    device: torch.device | str | None = None,
    row_start: int = 0,
) -> torch.Tensor:
    """The contract's z for rows ``row_start .. row_start + rows`` and columns ``0 .. cols``.

    Pure PyTorch (any device), float32, shape ``[rows, cols]``. Computed in float64 and
    rounded once, so it is the most accurate value of the contract.
    """
    check_seed(seed)
    offset = int(offset) & MASK32
    per = NORMALS_PER_CALL
    groups = (cols + per - 1) // per
    out = torch.empty(rows, groups * per, dtype=torch.float32, device=device)
    if rows == 0 or groups == 0:
        return out[:, :cols]
    g = torch.arange(groups, dtype=torch.int64, device=device)
    # bound the int64 temporaries to ~2**21 groups per chunk
    chunk = max(1, (1 << 21) // groups)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        r = torch.arange(row_start + r0, row_start + r1, dtype=torch.int64, device=device)
        c0 = g.expand(r1 - r0, groups)
        c1 = r[:, None].expand(r1 - r0, groups)
        words = philox4x32(c0, c1, stream, offset, seed & MASK32, seed >> 32)
        # z[.., 8 g + 2 i] = rho_i cos theta_i, z[.., 8 g + 2 i + 1] = rho_i sin theta_i
        normals = [n for x in words for n in _box_muller(x)]
        out[r0:r1] = torch.stack(normals, dim=-1).reshape(r1 - r0, groups * per)
    return out[:, :cols]


# ----------------------------------------------------------------------------- seeds
_MASK64 = (1 << 64) - 1
_state = {"seed": 0x5EED, "next_id": 0, "epoch": 0}
_id_lock = threading.Lock()


def mix64(*values: int) -> int:
    """SplitMix64-style hash of a tuple of ints into [0, 2**63)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


@torch.compiler.assume_constant_result  # dynamo: a constant of the traced graph
@functools.lru_cache(maxsize=65536)
def key_id(key: str) -> int:
    """A stable 63-bit id of a name (BLAKE2b): the same in every process and on every machine."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def manual_seed(seed: int) -> None:
    """Set the global noise seed and restart every layer's call counter (and the ids of layers
    built without :func:`fastnoise.convert` at 0).

    Like ``torch.manual_seed`` for dropout: the same forwards after it see the same noise, in
    this process or another one.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"manual_seed expects an int, got {seed!r}")
    if not -(2**63) <= seed < 2**64:  # torch.manual_seed's range; a negative seed wraps as there
        raise ValueError(f"manual_seed expects a seed in [-2**63, 2**64), got {seed}")
    _state["seed"] = seed & _MASK64
    _state["next_id"] = 0
    _state["epoch"] += 1  # counters compare their epoch with this and restart at 0 when it moved


def noise_epoch() -> int:
    """How many times :func:`manual_seed` ran: a counter kept under an older epoch restarts."""
    return _state["epoch"]


def initial_seed() -> int:
    """The global noise seed."""
    return _state["seed"]


def next_module_id() -> int:
    with _id_lock:  # layers built in two threads get two numbers
        i = _state["next_id"]
        _state["next_id"] = i + 1
    return i
