"""The noise stream: known answers, statistics, independence, reproducibility."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import fastnoise
from fastnoise import rng

M = 0xFFFFFFFF
# Random123 kat_vectors, philox4x32 with 10 rounds (and one with 7)
KAT = [
    ((0, 0, 0, 0), (0, 0), 10, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M, M, M, M), (M, M), 10, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), 10,
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), 7,
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
]


@pytest.mark.parametrize("ctr,key,rounds,want", KAT, ids=["zeros", "ones", "pi", "pi-7rounds"])
def test_philox_known_answers(ctr, key, rounds, want):
    out = rng.philox4x32(*ctr, *key, rounds=rounds)
    assert tuple(int(o) for o in out) == want


def test_normal_is_box_muller_of_philox_by_hand():
    seed, offset, r = (7 << 32) | 11, 3, 5
    z = rng.normal_grid(seed, offset, r + 1, 24)
    for c in (0, 9, 12, 23):  # group c // 8, word (c % 8) // 2, cos for even c, sin for odd c
        x = int(rng.philox4x32(c // 8, r, rng.STREAM_WEIGHT, offset, 11, 7)[(c % 8) // 2])
        a = ((x & 0xFFFF) + 0.5) / 65536
        b = ((x >> 16) + 0.5) / 65536
        trig = np.cos if c % 2 == 0 else np.sin
        expected = np.sqrt(-2 * np.log(a)) * trig(2 * np.pi * b)
        assert abs(z[r, c].item() - expected) < 1e-6, c


def test_bound_and_extremes():
    """|z| <= Z_MAX = sqrt(-2 ln 2**-17); the bound is reached by the smallest 16-bit radius."""
    assert rng.Z_MAX == pytest.approx(np.sqrt(-2 * np.log(2.0**-17)))
    x = torch.tensor([0x00000000, 0x40000000, 0x0000FFFF], dtype=torch.int64)  # angle 0 / ~90 deg
    cos, sin = rng._box_muller(x)
    assert cos[0].item() == pytest.approx(rng.Z_MAX, rel=1e-4)  # theta = 2 pi * 2**-17
    assert sin[1].item() == pytest.approx(rng.Z_MAX, rel=1e-4)  # theta ~ pi / 2
    assert abs(cos[2].item()) < 4e-3  # the largest 16-bit value: the smallest radius, 2**-8


N_STATS = 1 << 21  # 2M draws


@pytest.fixture(scope="module")
def big_sample():
    return rng.normal_grid(123456789, 0, 1024, N_STATS // 1024).double().flatten().numpy()


@pytest.mark.slow
def test_moments(big_sample):
    z, n = big_sample, big_sample.size
    assert n >= 1_000_000
    # 6-sigma bounds of each estimator under N(0, 1)
    assert abs(z.mean()) < 6 / np.sqrt(n)
    assert abs(z.var() - 1) < 6 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 6 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 6 * np.sqrt(24 / n)


@pytest.mark.slow
def test_tail_mass(big_sample):
    """16-bit radii: the tails still carry N(0, 1)'s mass (binomial 6-sigma bounds)."""
    n = big_sample.size
    for t in (2.0, 3.0, 4.0):
        p = 2 * stats.norm.sf(t)
        count = int((np.abs(big_sample) > t).sum())
        assert abs(count - n * p) < 6 * np.sqrt(n * p * (1 - p)) + 1, (t, count, n * p)


@pytest.mark.slow
def test_kolmogorov_smirnov(big_sample):
    assert stats.kstest(big_sample, "norm").pvalue > 1e-3
    # and a handful of other seeds, smaller samples
    for seed in range(1, 6):
        z = rng.normal_grid(seed, 0, 256, 1024).flatten().double().numpy()
        assert stats.kstest(z, "norm").pvalue > 1e-4


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


@pytest.mark.slow
def test_no_correlation_between_neighbours():
    z = rng.normal_grid(99, 0, 512, 1024)
    bound = 6 / np.sqrt(z.numel())
    assert abs(_corr(z[:, :-1], z[:, 1:])) < bound  # neighbouring columns (lanes of a group too)
    assert abs(_corr(z[:-1], z[1:])) < bound  # neighbouring rows
    per = rng.NORMALS_PER_CALL
    lane_bound = 6 / np.sqrt(z.numel() / per)  # 6 sigma for one lane's column count
    for lane_a in range(per):  # the eight outputs of one Philox call, pairwise
        for lane_b in range(lane_a + 1, per):
            assert abs(_corr(z[:, lane_a::per], z[:, lane_b::per])) < lane_bound
    # squares too: a Box-Muller pair shares a radius, the words of a call share nothing
    for lane_a, lane_b in [(0, 1), (2, 3), (0, 2), (1, 7)]:
        assert abs(_corr(z[:, lane_a::per] ** 2, z[:, lane_b::per] ** 2)) < lane_bound


def test_no_correlation_between_seeds_calls_streams():
    base = rng.normal_grid(5, 0, 512, 512)
    bound = 6 / np.sqrt(base.numel())
    assert abs(_corr(base, rng.normal_grid(6, 0, 512, 512))) < bound  # seeds
    assert abs(_corr(base, rng.normal_grid(5 | (1 << 40), 0, 512, 512))) < bound  # high key word
    assert abs(_corr(base, rng.normal_grid(5, 1, 512, 512))) < bound  # calls (offsets)
    assert abs(_corr(base, rng.normal_grid(5, 0, 512, 512, stream=1))) < bound  # weight vs bias


def test_same_seed_bit_identical_and_tiling_independent():
    a = rng.normal_grid(42, 7, 33, 70)
    assert torch.equal(a, rng.normal_grid(42, 7, 33, 70))
    # a sub-grid regenerated alone equals the same region of a larger grid
    big = rng.normal_grid(42, 7, 40, 101)
    assert torch.equal(a, big[:33, :70])
    assert torch.equal(big[10:20], rng.normal_grid(42, 7, 10, 101, row_start=10))
    assert not torch.equal(a, rng.normal_grid(43, 7, 33, 70))


def test_offset_is_32_bit():
    assert torch.equal(rng.normal_grid(1, 5, 4, 8), rng.normal_grid(1, 5 + (1 << 32), 4, 8))


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True], ids=repr)
def test_bad_seed(seed):
    with pytest.raises((ValueError, TypeError), match="seed"):
        rng.normal_grid(seed, 0, 2, 2)


def test_module_seeds_reproducible_and_fresh_per_call():
    def run():
        torch.manual_seed(0)  # weights
        fastnoise.manual_seed(3)  # noise
        layer = fastnoise.Linear(16, 8)
        x = torch.ones(2, 16)
        return [layer(x) for _ in range(3)], layer

    first, layer = run()
    second, _ = run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # a new draw per call
    assert int(layer.noise_calls) == 3
    fastnoise.manual_seed(4)
    other = fastnoise.Linear(16, 8)
    other.load_state_dict(layer.state_dict())
    assert not torch.equal(other(torch.ones(2, 16)), first[0])
    with pytest.raises(TypeError):
        fastnoise.manual_seed("1")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), offset=st.integers(0, 2**32 - 1),
       rows=st.integers(1, 9), cols=st.integers(1, 23), row_start=st.integers(0, 2**31 - 10))
def test_any_region_is_the_same_stream(seed, offset, rows, cols, row_start):
    """Whatever the seed, call and region, a sub-grid is the same region of a larger grid."""
    sub = rng.normal_grid(seed, offset, rows, cols, row_start=row_start)
    big = rng.normal_grid(seed, offset, rows + 1, cols + 5, row_start=row_start)
    assert torch.equal(sub, big[:rows, :cols])
    assert torch.isfinite(sub).all() and sub.abs().max() <= rng.Z_MAX + 1e-6  # a >= 2**-17 bounds |z|
