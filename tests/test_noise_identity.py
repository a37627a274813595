"""Who draws which noise: identity by qualified name, copies, reloads, manual_seed, chips.

- distinct layers draw independent noise, also when one was deep-copied from another inside a
  model (``nn.TransformerEncoder`` copies its layer);
- a model saved and loaded, or its ``state_dict`` loaded into a freshly built model of the same
  architecture, draws the same noise for the same seed and draw, in another process;
- the noise of a model does not depend on how many other layers the process built before it;
- ``fastnoise.manual_seed(s)`` followed by the same forwards reproduces the noise;
- ``evaluate_robustness(..., seed=s)`` puts several models on the same simulated chips.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import fastnoise
from fastnoise import NoiseSpec

SPEC = NoiseSpec(0.1, "absmax")


def _encoder_from_converted_layer():
    torch.manual_seed(0)
    layer = fastnoise.convert(nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, dropout=0.0), SPEC)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_deep_copies_inside_a_model_draw_their_own_noise():
    enc = _encoder_from_converted_layer()
    ids = [m.noise_id for _, m in fastnoise.noisy_layers(enc)]
    assert len(set(ids)) == len(ids), ids
    x = torch.randn(2, 5, 16)
    a, b = enc.layers[0], enc.layers[1]  # same weights (copies), so any difference is noise
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))
    with fastnoise.noise(draw=0):
        assert not torch.equal(a(x), b(x))
    a.train(), b.train()
    assert not torch.equal(a(x), b(x))
    # converting the encoder names the copies by their places in it
    fastnoise.convert(enc, SPEC)
    keys = [m.noise_key for _, m in fastnoise.noisy_layers(enc)]
    assert keys[:2] == ["layers.0.self_attn", "layers.0.self_attn.out_proj"]
    assert len({m.noise_id for _, m in fastnoise.noisy_layers(enc)}) == len(keys)


def test_whole_model_copies_keep_names_and_evaluate_on_the_same_chips():
    torch.manual_seed(0)
    model = fastnoise.convert(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)), NoiseSpec(0.3))
    twin = copy.deepcopy(model)
    assert [m.noise_key for _, m in fastnoise.noisy_layers(twin)] == ["0", "2"]
    assert [m.noise_id for _, m in fastnoise.noisy_layers(twin)] != [
        m.noise_id for _, m in fastnoise.noisy_layers(model)]  # a copy has its own id ...
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)) for _ in range(2)]
    run = dict(etas=[0.3], draws=6, progress=False)
    a = fastnoise.evaluate_robustness(model, data, seed=5, **run).accuracies
    b = fastnoise.evaluate_robustness(twin, data, seed=5, **run).accuracies
    assert a == b  # ... but with seed= both sit on the chips of their layers' names
    c = fastnoise.evaluate_robustness(model, data, seed=6, **run).accuracies
    assert a != c
    # and the ids are back afterwards
    assert all("_draw_wids" not in m.__dict__ for _, m in fastnoise.noisy_layers(model))


def test_noise_does_not_depend_on_layers_built_before():
    def build():
        torch.manual_seed(0)
        return fastnoise.convert(nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)), SPEC)

    x = torch.randn(4, 6)
    fastnoise.manual_seed(3)
    first = build().eval()
    with fastnoise.noise(draw=2):
        want = first(x)
    for _ in range(5):  # other layers, built and converted in between
        fastnoise.Linear(3, 3)
        fastnoise.convert(nn.Linear(4, 4))
    second = build().eval()
    with fastnoise.noise(draw=2):
        assert torch.equal(second(x), want)
    fastnoise.manual_seed(3)
    t1 = first.train()(x)
    fastnoise.manual_seed(3)
    assert torch.equal(second.train()(x), t1)


def test_manual_seed_restarts_the_counters():
    torch.manual_seed(0)
    model = fastnoise.convert(nn.LSTM(5, 7), SPEC).train()
    x = torch.randn(3, 2, 5)
    fastnoise.manual_seed(9)
    a = [model(x)[0] for _ in range(3)]
    fastnoise.manual_seed(9)
    b = [model(x)[0] for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])
    fastnoise.manual_seed(10)
    assert not torch.equal(model(x)[0], a[0])


def test_noise_state_round_trip_of_many_weight_modules():
    torch.manual_seed(0)
    model = fastnoise.convert(nn.Sequential(nn.LSTM(5, 7, num_layers=2)), SPEC).train()
    x = torch.randn(3, 2, 5)
    model(x)
    state = fastnoise.noise_state_dict(model)
    assert state["0"]["calls"] == {"weight_ih_l0": 1, "weight_hh_l0": 1, "weight_ih_l1": 1, "weight_hh_l1": 1}
    a = model(x)[0]
    fastnoise.load_noise_state_dict(model, state)
    assert torch.equal(model(x)[0], a)


_CHILD = textwrap.dedent('''
    import json, sys, warnings
    import torch, torchvision, fastnoise
    from torch import nn
    warnings.simplefilter("ignore")
    out, mode, path = sys.argv[1], sys.argv[2], sys.argv[3]
    for _ in range(7):  # a process that built other layers first
        fastnoise.convert(nn.Linear(3, 3))
    if mode == "pickle":
        model = torch.load(path, weights_only=False)
    else:
        torch.manual_seed(123)  # other initial weights: the state_dict replaces them
        model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                     hidden_dim=16, mlp_dim=24, num_classes=5)
        fastnoise.convert(model, fastnoise.NoiseSpec(0.1, "absmax"))
        model.load_state_dict(torch.load(path, weights_only=True))
    x = torch.load(path + ".x", weights_only=True)
    fastnoise.manual_seed(4)
    model.eval()
    with fastnoise.noise(draw=3):
        chip = model(x)
    model.train()
    step = model(x)
    json.dump({"chip": chip.tolist(), "step": step.tolist()}, open(out, "w"))
''')


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pickle", "state_dict"])
def test_saved_model_draws_the_same_noise_in_another_process(tmp_path, mode):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=24, num_classes=5)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastnoise.convert(model, SPEC)
    model.encoder.dropout.p = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 3, 16, 16)
    path = str(tmp_path / "model.pt")
    torch.save(model if mode == "pickle" else model.state_dict(), path)
    torch.save(x, path + ".x")
    fastnoise.manual_seed(4)
    model.eval()
    with fastnoise.noise(draw=3):
        chip = model(x)
    model.train()
    step = model(x)
    out = str(tmp_path / "out.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    if mode == "state_dict":  # the child sets dropout to 0 the same way
        script = _CHILD.replace("    x = torch.load", "    [setattr(m, 'p', 0.0) for m in model.modules() "
                                "if isinstance(m, nn.Dropout)]\n    x = torch.load")
    else:
        script = _CHILD
    subprocess.run([sys.executable, "-c", script, out, mode, path], check=True, env=env, timeout=300)
    got = json.load(open(out))
    assert torch.equal(torch.tensor(got["chip"]), chip)
    assert torch.equal(torch.tensor(got["step"]), step)


# ----------------------------------------------------------------------------- convert again, NaN
def test_convert_again_applies_the_new_spec():
    model = fastnoise.convert(nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 3)), NoiseSpec(0.05))
    fastnoise.convert(model, NoiseSpec(0.2, "absmax_per_channel"))
    assert {m.spec for _, m in fastnoise.noisy_layers(model)} == {NoiseSpec(0.2, "absmax_per_channel")}
    assert len(fastnoise.noisy_layers(model)) == 2


@pytest.mark.parametrize("scale", ["range", "absmax", "absmax_per_channel"])
def test_a_nan_weight_poisons_what_torch_poisons(scale):
    import fastnoise.spec as spec_module

    spec_module._warned_nonfinite.clear()
    lin = fastnoise.Linear(6, 5, spec=NoiseSpec(0.05, scale)).train()
    with torch.no_grad():
        lin.weight[2, 3] = float("nan")
        lin.weight[4, 0] = float("inf")
    x = torch.randn(3, 6)
    with pytest.warns(RuntimeWarning, match="2 NaN or inf"):
        y = lin(x)
    clean = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert torch.equal(torch.isfinite(y), torch.isfinite(clean))  # the same outputs poisoned
    finite = torch.isfinite(clean)
    assert not torch.equal(y[finite], clean[finite])  # and the others still noisy
    w = lin.weight.detach().clone()
    w[~torch.isfinite(w)] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        sigma = lin.spec.sigma(lin.weight)
    if scale != "absmax_per_channel":
        ok = lin.weight.detach()[torch.isfinite(lin.weight.detach())]
        expect = (ok.max() - ok.min()) if scale == "range" else ok.abs().max()
        torch.testing.assert_close(sigma, (expect * 0.05).reshape(1))
