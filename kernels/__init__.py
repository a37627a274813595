"""Triton kernels of fastnoise, installed as ``fastnoise.kernels``.

Each file holds one op's kernels and their host launchers; the noise they add follows the
contract of :mod:`fastnoise.rng`, implemented in Triton in :mod:`fastnoise.kernels.philox`.
"""
