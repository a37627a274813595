"""Drop-in modules, convert / restore, saved tensors, noise switching."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnoise
from fastnoise import NoiseSpec


def _saved_tensors(fn):
    """Every tensor autograd saves while ``fn()`` runs (outputs kept alive so nothing is freed)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def _weight_sized(saved, weight):
    return [t for t in saved if t.numel() >= weight.numel()]


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_saves_nothing_weight_sized_beyond_clean_layer(kind, autocast):
    torch.manual_seed(0)
    if kind == "linear":
        clean = nn.Linear(64, 48)
        x = torch.randn(3, 64, requires_grad=True)  # smaller than the weight
    else:
        clean = nn.Conv2d(16, 32, 3, padding=1)
        x = torch.randn(1, 16, 5, 5, requires_grad=True)
    noisy = fastnoise.convert(nn.Sequential(clean), NoiseSpec(0.1))[0]
    assert isinstance(noisy, fastnoise.Linear if kind == "linear" else fastnoise.Conv2d)
    clean_ref = nn.Sequential(nn.Linear(64, 48) if kind == "linear" else nn.Conv2d(16, 32, 3, padding=1))
    clean_ref[0].load_state_dict(noisy.state_dict())
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        saved_clean, _ = _saved_tensors(lambda: clean_ref(x))
        saved_noisy, out = _saved_tensors(lambda: noisy(x))
    w = noisy.weight
    big_clean = _weight_sized(saved_clean, w)
    big_noisy = _weight_sized(saved_noisy, w)
    assert len(big_noisy) <= len(big_clean), (
        f"noisy layer saves {[tuple(t.shape) for t in big_noisy]}, "
        f"clean {[tuple(t.shape) for t in big_clean]}")
    # what it does save of the weight's size is the parameter itself, not a noisy copy
    for t in big_noisy:
        if t.shape == w.shape:
            assert t.data_ptr() == w.data_ptr()
    out.float().sum().backward()  # and the backward still works from what was saved
    assert noisy.weight.grad is not None and x.grad is not None


def test_linear_drop_in_signature_state_dict_repr():
    torch.manual_seed(0)
    ref = nn.Linear(7, 3, bias=False, dtype=torch.float64)
    torch.manual_seed(0)
    lin = fastnoise.Linear(7, 3, bias=False, dtype=torch.float64, spec=NoiseSpec(0.05, "absmax"))
    assert isinstance(lin, nn.Linear)
    assert list(lin.state_dict()) == list(ref.state_dict()) == ["weight"]
    assert torch.equal(lin.weight, ref.weight)
    assert repr(lin) == ("Linear(in_features=7, out_features=3, bias=False, "
                         "spec=NoiseSpec(eta=0.05, scale='absmax'))")
    conv = fastnoise.Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2, padding_mode="reflect")
    assert list(conv.state_dict()) == ["weight", "bias"]
    assert repr(conv).startswith(repr(nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2,
                                                padding_mode="reflect"))[:-1])
    assert "spec=NoiseSpec(eta=0.06, scale='range')" in repr(conv)


def test_noise_in_train_not_in_eval_unless_asked():
    lin = fastnoise.Linear(16, 8)
    x = torch.randn(4, 16)
    clean = F.linear(x, lin.weight, lin.bias)
    lin.train()
    assert not torch.allclose(lin(x), clean)
    lin.eval()
    assert torch.equal(lin(x), clean)
    with fastnoise.noise():
        noisy_eval = lin(x)
    assert not torch.allclose(noisy_eval, clean)
    with fastnoise.noise(eta=0.0):
        assert torch.equal(lin(x), clean)
    lin.train()
    with fastnoise.noise(enabled=False):
        assert torch.equal(lin(x), clean)


def test_noise_context_overrides_spec_and_draw_is_fixed():
    lin = fastnoise.Linear(32, 32, bias=False).eval()
    x = torch.eye(32)
    with fastnoise.noise(eta=0.2, scale="absmax"):
        big = lin(x) - lin.weight.t()
    with fastnoise.noise(eta=0.02, scale="absmax"):
        small = lin(x) - lin.weight.t()
    ratio = (big.std() / small.std()).item()
    assert 7 < ratio < 13  # sigma scales with eta (10x), up to sampling error
    calls = int(lin.noise_calls)
    with fastnoise.noise(draw=3):
        a, b = lin(x), lin(x)
    with fastnoise.noise(draw=4):
        c = lin(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(lin.noise_calls) == calls  # draws do not advance the training counters
    with pytest.raises(ValueError, match="draw"):
        with fastnoise.noise(draw=-1):
            pass
    with pytest.raises(ValueError, match="eta"):
        with fastnoise.noise(eta=-0.5):
            pass


def test_padding_modes_match_torch_without_noise():
    for mode in ("zeros", "reflect", "replicate", "circular"):
        conv = fastnoise.Conv2d(3, 4, 3, padding=1, padding_mode=mode)
        ref = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)
        ref.load_state_dict(conv.state_dict())
        x = torch.randn(2, 3, 6, 5)
        with fastnoise.noise(eta=0.0):
            conv.train()
            torch.testing.assert_close(conv(x), ref(x))
        # with noise, the padding still happens the torch way (shape and the mode are kept)
        assert conv(x).shape == ref(x).shape


@pytest.fixture(scope="module")
def resnet50_pair():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None).eval()
    model = torchvision.models.resnet50(weights=None).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


@pytest.mark.slow
def test_convert_resnet50(resnet50_pair):
    ref, model = resnet50_pair
    out = fastnoise.convert(model, NoiseSpec(0.06))
    assert out is model
    kinds = [type(m) for _, m in fastnoise.noisy_layers(model)]
    assert kinds.count(fastnoise.Conv2d) == 53 and kinds.count(fastnoise.Linear) == 1
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # eval: noise off
        with fastnoise.noise(enabled=False):
            model.train()
            ref.train()
            torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
            model.eval()
            ref.eval()
        with fastnoise.noise(eta=0.06):
            assert not torch.allclose(model(x), want)
    # state_dict loads both ways
    torchvision = pytest.importorskip("torchvision")
    ref2 = torchvision.models.resnet50(weights=None)
    ref2.load_state_dict(model.state_dict())
    assert torch.equal(ref2.layer3[1].conv2.weight, model.layer3[1].conv2.weight)
    with torch.no_grad():
        model.layer3[1].conv2.weight.zero_()
    model.load_state_dict(ref.state_dict())
    assert torch.equal(ref.layer3[1].conv2.weight, model.layer3[1].conv2.weight)
    # restore gives back torch modules with the same parameters and outputs
    fastnoise.restore(model)
    assert fastnoise.noisy_layers(model) == []
    assert sum(type(m) is nn.Conv2d for m in model.modules()) == 53
    assert type(model.fc) is nn.Linear
    assert "noise_calls" not in dict(model.named_buffers()).keys()
    with torch.no_grad():  # (the train-mode passes above moved both models' BN statistics alike)
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_convert_exclude_and_keeps_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    params = [id(p) for p in model.parameters()]
    fastnoise.convert(model, NoiseSpec(0.1), exclude="2")
    assert type(model[0]) is fastnoise.Conv2d and type(model[2]) is nn.Linear
    assert [id(p) for p in model.parameters()] == params  # an optimizer built before stays valid
    fastnoise.restore(model)
    fastnoise.convert(model, exclude=lambda name, m: isinstance(m, nn.Conv2d))
    assert type(model[0]) is nn.Conv2d and type(model[2]) is fastnoise.Linear
    with pytest.raises(TypeError, match="NoiseSpec"):
        fastnoise.convert(model, spec=0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        fastnoise.convert("model")


def test_noise_state_round_trip():
    model = fastnoise.convert(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    x = torch.randn(3, 8)
    model(x)
    state = fastnoise.noise_state_dict(model)
    a = model(x)
    fastnoise.load_noise_state_dict(model, state)
    assert torch.equal(model(x), a)
    with pytest.raises(ValueError, match="missing"):
        fastnoise.load_noise_state_dict(model, {"0": state["0"]})


def test_noisy_passes_in_inference_mode_then_training():
    """Counters advanced under inference_mode stay normal tensors that backward can save."""
    lin = fastnoise.Linear(8, 4)
    x = torch.randn(2, 8)
    with torch.inference_mode(), fastnoise.noise():
        a = lin(x)
    assert int(lin.noise_calls) == 1 and not lin.noise_calls.is_inference()
    lin.train()
    b = lin(x)
    b.sum().backward()
    assert lin.weight.grad is not None and int(lin.noise_calls) == 2
    assert not torch.allclose(a, b)  # a new call, a new draw


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_refuses_instead_of_wrong_gradients(reentrant):
    """Activation checkpointing recomputes the forward inside backward, where the call counter
    would have moved on: the layer raises rather than return gradients of other noise. With a
    fixed draw both passes see the same noise, and the gradients equal the plain ones."""
    from torch.utils.checkpoint import checkpoint

    def run(use_ckpt, draw=None):
        torch.manual_seed(0)
        fastnoise.manual_seed(0)
        m = nn.Sequential(fastnoise.Linear(16, 16), nn.Tanh(), fastnoise.Linear(16, 4)).train()
        x = torch.randn(3, 16, requires_grad=True)
        ctx = fastnoise.noise(draw=draw) if draw is not None else contextlib.nullcontext()
        with ctx:
            y = checkpoint(m, x, use_reentrant=reentrant) if use_ckpt else m(x)
            y.square().sum().backward()
        return m[0].weight.grad

    with pytest.raises(RuntimeError, match="inside a backward pass"):
        run(True)
    assert torch.equal(run(True, draw=2), run(False, draw=2))
