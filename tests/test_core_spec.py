import dataclasses
import math

import pytest
import torch

from fastnoise import NoiseSpec
from fastnoise.spec import MODE_PROPORTIONAL, MODE_ROW, MODE_TENSOR


@pytest.mark.parametrize("eta", [-0.01, -1, float("nan"), float("inf")], ids=str)
def test_bad_eta_raises_naming_value(eta):
    with pytest.raises(ValueError, match="eta") as e:
        NoiseSpec(eta=eta)
    assert str(eta) in str(e.value)


@pytest.mark.parametrize("eta", ["0.1", None, True], ids=repr)
def test_eta_must_be_a_number(eta):
    with pytest.raises(TypeError, match="eta"):
        NoiseSpec(eta=eta)


def test_unknown_scale_names_value():
    with pytest.raises(ValueError, match="'rms'"):
        NoiseSpec(scale="rms")


def test_spec_is_frozen_and_replace_validates():
    s = NoiseSpec(0.05)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.eta = 0.1
    assert s.replace(eta=0.1) == NoiseSpec(0.1)
    with pytest.raises(ValueError):
        s.replace(eta=-1)


W = torch.tensor([[0.5, -2.0, 1.0], [3.0, 0.25, -0.5]])
B = torch.tensor([4.0, -5.0])


@pytest.mark.parametrize(
    "scale,noise_bias,expected,mode",
    [
        ("range", False, [0.1 * (3.0 - -2.0)], MODE_TENSOR),
        ("range", True, [0.1 * (4.0 - -5.0)], MODE_TENSOR),
        ("absmax", False, [0.1 * 3.0], MODE_TENSOR),
        ("absmax", True, [0.1 * 5.0], MODE_TENSOR),
        ("absmax_per_channel", False, [0.1 * 2.0, 0.1 * 3.0], MODE_ROW),
        ("absmax_per_channel", True, [0.1 * 4.0, 0.1 * 5.0], MODE_ROW),
        ("proportional", False, [0.1], MODE_PROPORTIONAL),
    ],
)
def test_sigma_by_hand(scale, noise_bias, expected, mode):
    spec = NoiseSpec(0.1, scale, noise_bias)
    sigma = spec.sigma(W, B)
    assert spec.mode == mode
    assert sigma.dtype == torch.float32
    torch.testing.assert_close(sigma, torch.tensor(expected), rtol=1e-6, atol=0)


def test_sigma_of_conv_weight_uses_gemm_rows():
    w = torch.randn(4, 3, 2, 2)
    sigma = NoiseSpec(0.2, "absmax_per_channel").sigma(w)
    torch.testing.assert_close(sigma, 0.2 * w.reshape(4, -1).abs().amax(1))


def test_sigma_is_detached():
    w = torch.randn(3, 3, requires_grad=True)
    assert not NoiseSpec().sigma(w).requires_grad
    assert math.isclose(NoiseSpec(0.0).sigma(w).item(), 0.0)
