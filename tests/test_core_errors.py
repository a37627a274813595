"""Bad input gets a clear error that names the offending value."""

import warnings

import pytest
import torch

import fastnoise
from fastnoise import NoiseSpec
from fastnoise.functional import noisy_conv2d, noisy_linear

X, W, B = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
XC, WC = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: noisy_linear(X.long(), W), TypeError, "torch.int64"),
        (lambda: noisy_linear(X, W.int()), TypeError, "torch.int32"),
        (lambda: noisy_linear(X.double(), W), TypeError, "float64 does not match weight dtype torch.float32"),
        (lambda: noisy_linear(X, W, B.to(torch.bool)), TypeError, "bias"),
        (lambda: noisy_linear(X.numpy(), W), TypeError, "ndarray"),
        (lambda: noisy_linear(X, W.to("meta")), ValueError, "input is on cpu but weight is on meta"),
        (lambda: noisy_linear(X, W, B.to("meta")), ValueError, "bias is on meta"),
        (lambda: noisy_linear(X[:, :5], W), ValueError, r"in_features=6.*\(4, 5\)"),
        (lambda: noisy_linear(X, W[None]), ValueError, r"2-D.*\(1, 3, 6\)"),
        (lambda: noisy_linear(X, W, B[:2]), ValueError, r"bias must have shape \(3,\), got \(2,\)"),
        (lambda: noisy_linear(X, W, spec=0.1), TypeError, "NoiseSpec"),
        (lambda: noisy_linear(X, W, seed=-3), ValueError, "-3"),
        (lambda: noisy_linear(X, W, offset=-1), ValueError, "-1"),
        (lambda: noisy_linear(X, W, path="cuda"), ValueError, "'cuda'"),
        (lambda: noisy_conv2d(XC, WC[:, :3]), ValueError, "4 channels"),
        (lambda: noisy_conv2d(XC[0, 0], WC), ValueError, r"3-D or 4-D.*\(8, 8\)"),
        (lambda: noisy_conv2d(XC, WC[..., 0]), ValueError, r"4-D.*\(6, 4, 3\)"),
        (lambda: noisy_conv2d(XC, WC, stride=0), ValueError, r"\[0, 0\]"),
        (lambda: noisy_conv2d(XC, WC, padding=-1), ValueError, "-1"),
        (lambda: noisy_conv2d(XC, WC, padding="full"), ValueError, "'full'"),
        (lambda: noisy_conv2d(XC, WC, groups=0), ValueError, "groups"),
        (lambda: noisy_conv2d(XC, WC, groups=3), ValueError, "groups=3"),
        (lambda: noisy_conv2d(XC[..., :2, :2], WC), ValueError, "too small"),
        (lambda: noisy_conv2d(XC, WC, stride=2, padding="same"), ValueError, "same"),
        (lambda: NoiseSpec(eta=-0.06), ValueError, "-0.06"),
        (lambda: NoiseSpec(eta=float("nan")), ValueError, "nan"),
        (lambda: NoiseSpec(scale="per_tensor"), ValueError, "'per_tensor'"),
        (lambda: fastnoise.Linear(6, 3, spec="range"), TypeError, "NoiseSpec"),
    ],
    ids=[
        "linear-int-input", "linear-int-weight", "linear-dtype-mix", "linear-bool-bias", "linear-numpy",
        "linear-device-mix-weight", "linear-device-mix-bias", "linear-in-features", "linear-3d-weight",
        "linear-bias-shape", "linear-spec-type", "linear-negative-seed", "linear-negative-offset",
        "linear-bad-path", "conv-channels", "conv-2d-input", "conv-3d-weight", "conv-stride-0",
        "conv-negative-padding", "conv-padding-string", "conv-groups-0", "conv-groups-mismatch",
        "conv-input-too-small", "conv-same-strided", "spec-negative-eta", "spec-nan-eta",
        "spec-unknown-scale", "module-spec-type",
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_negative_eta_in_module_forward_context():
    lin = fastnoise.Linear(6, 3)
    with pytest.raises(ValueError, match="-1"):
        with fastnoise.noise(eta=-1.0):
            lin(X)


def test_gpu_path_on_cpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from fastnoise import dispatch

    dispatch._warned.clear()
    with pytest.warns(RuntimeWarning, match="unavailable"):
        a = noisy_linear(X, W, path="generate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explained once only
        b = noisy_linear(X, W, path="generate")
    assert torch.equal(a, b)
    assert torch.equal(a, noisy_linear(X, W, path="reference"))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastnoise.noise(draw=2**32 + 1).__enter__(), ValueError, r"2\*\*32.*4294967297"),
        (lambda: fastnoise.noise(draw=-1).__enter__(), ValueError, "-1"),
        (lambda: fastnoise.noise(enabled="no").__enter__(), TypeError, "'no'"),
        (lambda: fastnoise.noise(enabled=0).__enter__(), TypeError, "0"),
        (lambda: fastnoise.manual_seed(2**64 + 5), ValueError, str(2**64 + 5)),
        (lambda: fastnoise.manual_seed(-(2**63) - 1), ValueError, str(-(2**63) - 1)),
    ],
    ids=["draw-past-32-bits", "draw-negative", "enabled-string", "enabled-int", "seed-past-64-bits",
         "seed-below-int64"],
)
def test_out_of_range_draws_seeds_and_non_bool_enabled_are_refused(call, exc, match):
    """Not wrapped silently (draw 2**32 + 1 was chip 1, seed 2**64 + 5 was seed 5)."""
    with pytest.raises(exc, match=match):
        call()
    assert fastnoise.context.current() is None  # nothing left pushed


def test_the_edges_of_the_draw_and_seed_ranges_are_taken():
    lin = fastnoise.Linear(6, 3).eval()
    with fastnoise.noise(draw=2**32 - 1):
        a = lin(X)
    with fastnoise.noise(draw=0):
        b = lin(X)
    assert not torch.equal(a, b)
    fastnoise.manual_seed(2**64 - 1)
    assert fastnoise.initial_seed() == 2**64 - 1
    fastnoise.manual_seed(-1)  # wraps, as torch.manual_seed(-1) does
    assert fastnoise.initial_seed() == 2**64 - 1
