"""Drop-in edges: empty layers, the meta device, parametrized weights, as torch's layers have them.

- ``fastnoise.Linear(0, 4)`` / ``Linear(4, 0)`` and Conv2d with empty weights do in train mode
  what ``torch.nn.Linear`` / ``Conv2d`` do (an empty weight has no noise: sigma of nothing is 0);
- a converted model on the meta device runs a train-mode forward and backward (shapes, FLOPs);
- a converted model with a ``weight_norm`` parametrization deep-copies, and the copy draws noise
  of its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastnoise
from fastnoise import NoiseSpec

SPEC = NoiseSpec(0.1, "range", noise_bias=True)
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def _same_as_torch(layer, torch_layer, x):
    """Forward and every gradient of the fastnoise layer (train mode) equal torch's, or both raise
    the same error."""
    torch_layer.load_state_dict(layer.state_dict())
    layer.train(), torch_layer.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        want = torch_layer(xb)
    except RuntimeError as e:
        with pytest.raises(RuntimeError, match=str(e).split("\n")[0][:40]):
            layer(xa)
        return
    got = layer(xa)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (got.sum() + got.square().sum()).backward()
    (want.sum() + want.square().sum()).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)
    for (name, p), q in zip(layer.named_parameters(), torch_layer.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("scale", ["range", "absmax", "absmax_per_channel", "proportional"])
@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 0)], ids=["in0", "out0", "both0"])
def test_empty_linear_in_train_mode_works_as_torch(shape, scale):
    layer = fastnoise.Linear(*shape, spec=NoiseSpec(0.1, scale, noise_bias=True))
    _same_as_torch(layer, nn.Linear(*shape), torch.randn(3, shape[0]))


@pytest.mark.parametrize("channels", [(0, 4), (4, 0)], ids=["in0", "out0"])
def test_empty_conv2d_in_train_mode_works_as_torch(channels):
    cin, cout = channels
    layer = fastnoise.Conv2d(cin, cout, 3, padding=1, spec=SPEC)
    _same_as_torch(layer, nn.Conv2d(cin, cout, 3, padding=1), torch.randn(2, cin, 5, 5))


def test_converted_model_on_meta_device_runs_a_train_mode_forward_and_backward():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 7))
    fastnoise.convert(model, SPEC)
    clean_shape = model.eval()(torch.randn(2, 3, 5, 5)).shape
    model = model.to("meta").train()
    x = torch.randn(2, 3, 5, 5, device="meta", requires_grad=True)
    y = model(x)
    assert y.is_meta and y.shape == clean_shape == (2, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.is_meta
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    with torch.device("meta"):  # built on meta, as shape and FLOP counting does
        lin = fastnoise.Linear(5, 4, spec=SPEC).train()
    assert lin(torch.empty(3, 5, device="meta")).shape == (3, 4)


def _weight_norm_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    nn.utils.parametrizations.weight_norm(model[0])
    return fastnoise.convert(model, NoiseSpec(0.1, "absmax"))


def test_weight_norm_parametrized_model_deep_copies_and_the_copy_draws_its_own_noise():
    original = _weight_norm_model()
    twin = copy.deepcopy(original)
    assert twin[0] is not original[0]
    assert nn.utils.parametrize.is_parametrized(twin[0], "weight")
    for a, b in zip(original.state_dict().values(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.data_ptr() != b.data_ptr()  # copied, not shared
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), original.eval()(x), rtol=0, atol=0)  # same clean model
        with fastnoise.noise(draw=1):
            a, b = original(x), twin(x)
    assert not torch.allclose(a, b)  # the copy is another chip
    assert twin[0].noise_id != original[0].noise_id
    # the copy trains: its parametrization's own tensors get the gradients
    twin.train()(x).sum().backward()
    assert twin[0].parametrizations.weight.original0.grad is not None
    assert original[0].parametrizations.weight.original0.grad is None
