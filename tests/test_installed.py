"""An install runs the C++ CPU kernels: the sources come with the package, the library builds
from them and loads, and the CPU ``auto`` path runs it and matches the reference, forward and
every gradient.

Self-contained (no conftest, no other test module): ``.ci/run`` copies this file out of the tree
and runs it against the wheel installed into a fresh environment, with
``FASTNOISE_TEST_INSTALLED=1``, which also requires fastnoise to come from an install (not a
checkout) and turns "no kernels" from a skip into a failure. In the suite it checks the checkout.
"""

import os
from pathlib import Path

import pytest
import torch

import fastnoise
from fastnoise import NoiseSpec, _backends_linear, _cpu
from fastnoise.functional import noisy_linear
from fastnoise.testing import assert_close_to_reference

INSTALLED = os.environ.get("FASTNOISE_TEST_INSTALLED") == "1"
PACKAGE = Path(fastnoise.__file__).resolve().parent


def _checkout() -> bool:
    return (PACKAGE.parent / "pyproject.toml").is_file() and (PACKAGE.parent / "csrc").is_dir()


def test_the_sources_come_with_the_package():
    if INSTALLED:
        assert not _checkout(), f"fastnoise was imported from a checkout ({PACKAGE}), not an install"
    expected = PACKAGE.parent / "csrc" / "ops" if _checkout() else PACKAGE / "_csrc" / "ops"
    assert _cpu.sources_dir() == expected
    missing = [rel for rel in _cpu.SOURCES if not (expected / rel).is_file()]
    assert not missing, f"not installed: {missing}"


def _fwd_bwd(x, w, b, path):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = noisy_linear(x, w, b, NoiseSpec(0.1, noise_bias=True), 11, 3, path=path)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), grad))


def test_the_cpp_kernels_run_and_match_the_reference():
    if not _cpu.available():
        if INSTALLED:
            pytest.fail(f"the C++ CPU kernels did not load: {_cpu.why_unavailable()}")
        pytest.skip(f"no C++ CPU kernels ({_cpu.why_unavailable()})")
    library = Path(_cpu.library_path())
    assert library.is_file() and _cpu._check_library(library) == ""
    x, w, b = torch.randn(5, 41), torch.randn(7, 41), torch.randn(7)
    assert _backends_linear.choose("auto", x, w).name == "cpu"
    assert _backends_linear.choose("auto", x, w, backward=True).name == "cpu"
    got = _fwd_bwd(x, w, b, "auto")
    same = _fwd_bwd(x, w, b, "reference")
    up = _fwd_bwd(x.double(), w.double(), b.double(), "reference")
    names = ("output", "grad input", "grad weight", "grad bias")
    for name, a, t, r in zip(names, got, same, up, strict=True):
        assert_close_to_reference(a, t, r, name=name)
    assert not torch.equal(got[0], torch.nn.functional.linear(x, w, b))  # the noise is there
