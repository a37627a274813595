"""Many noisy weights in one launch, and ``fastnoise.pregenerate.pregenerated(model)``.

The multi-tensor kernel must reproduce ``noise_gen.noisy_weight`` / ``noisy_bias`` bit for bit
(same tiles, same math); a model inside ``pregenerated`` must give the outputs it gives without
(same seeds, offsets and counters), while generating once per forward, or once per draw.
"""

import pytest
import torch
from fastnoise.kernels import noise_gen
from torch import nn

import fastnoise
from fastnoise import NoiseSpec, pregenerate
from fastnoise.pregenerate import noisy_weights, pregenerated

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
CL = torch.channels_last


def _entries():
    """Weights of several shapes and layouts, a bias, an empty weight; mixed modes and dtypes."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)
    return [  # (tensor, spec, seed, offset, stream)
        (r(7, 5, 3, 3), NoiseSpec(0.1, "range"), (1 << 62) + 5, torch.tensor(3), 0),
        (r(16, 8, 1, 1).to(memory_format=CL), NoiseSpec(0.1, "absmax_per_channel"), 2**33 + 7, 4, 0),
        (r(10, 33), NoiseSpec(0.2, "proportional"), 3, torch.tensor(2**31 + 5), 0),
        (r(130, 3, 5, 3).to(memory_format=CL), NoiseSpec(0.1, "absmax"), 0xFFFFFFFF, 0, 0),
        (r(0, 4), NoiseSpec(0.1, "range"), 5, 1, 0),
        (r(19).bfloat16(), NoiseSpec(0.1, "absmax_per_channel"), 77, torch.tensor(9), 1),
        (r(5, 7).bfloat16(), NoiseSpec(0.1, "absmax_per_channel"), 78, torch.tensor(9), 0),
    ]


def _sigma(t, spec):
    if t.numel() == 0:
        return torch.ones(1, device=t.device)
    return spec.sigma(t if t.dim() > 1 else t.reshape(-1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_multi_matches_single_launches_bit_for_bit(dtype, monkeypatch):
    monkeypatch.setattr(noise_gen, "_empty", lambda n, **k: torch.full((n,), float("nan"), **k))
    entries = [(t.to(DEVICE), s, seed, off, st) for t, s, seed, off, st in _entries()]
    tensors = [e[0] for e in entries]
    sigmas = [_sigma(t, s) for t, s, *_ in entries]
    got = noise_gen.noisy_weights_multi(tensors, sigmas, [e[1].mode for e in entries],
                                        [e[2] for e in entries], [e[3] for e in entries], dtype,
                                        [e[4] for e in entries])
    for (t, spec, seed, off, stream), sigma, y in zip(entries, sigmas, got, strict=True):
        off_t = off if isinstance(off, torch.Tensor) else torch.tensor(off & 0xFFFFFFFF)
        one = noise_gen.noisy_bias if stream else noise_gen.noisy_weight
        want = one(t, sigma, spec.mode, seed, off_t.to(t.device), dtype)
        assert y.shape == want.shape and y.dtype == dtype
        assert y.stride() == want.stride()  # the weight's memory format is kept
        assert torch.equal(y, want)


def test_multi_rejects_bad_arguments():
    w = torch.randn(4, 4)
    s = torch.ones(1)
    with pytest.raises(ValueError, match="same length"):
        noise_gen.noisy_weights_multi([w, w], [s], [0, 0], [1, 2], [0, 0], torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        noise_gen.noisy_weights_multi([w], [s], [0], [1], [0], torch.float64)
    with pytest.raises(TypeError, match="tensor 0"):
        noise_gen.noisy_weights_multi([w.double()], [s], [0], [1], [0], torch.float32)


@pytest.fixture(autouse=True)
def _triton_launch_on_cpu_too(monkeypatch):
    """These tests check the one Triton launch per forward; on the CPU it runs through the
    interpreter (by default a CPU model pregenerates with the layers' own C++ generator)."""
    monkeypatch.setattr(pregenerate, "TRITON_OFF_CUDA", True)


def test_cpu_default_uses_the_layers_generator_with_the_same_outputs(monkeypatch):
    monkeypatch.setattr(pregenerate, "TRITON_OFF_CUDA", False)
    torch.manual_seed(0)
    model = fastnoise.convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                              fastnoise.NoiseSpec(eta=0.2)).eval()
    x = torch.randn(5, 8)
    calls = []
    monkeypatch.setattr(noise_gen, "noisy_weights_multi", lambda *a, **k: calls.append(1))
    with torch.no_grad(), fastnoise.noise(draw=2):
        own = model(x)
        with pregenerated(model):
            got = model(x)
    assert not calls  # no Triton launch for CPU weights
    torch.testing.assert_close(got, own, rtol=0, atol=0)


# ----------------------------------------------------------------------------- pregenerated(model)
def _model(spec=NoiseSpec(0.1, "absmax_per_channel", noise_bias=True)):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect"),  # depthwise, reflect padding
        nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    ).to(DEVICE)
    return fastnoise.convert(m, spec)


def _x():
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE)


def _counters(model):
    return [int(m.noise_calls) for _, m in fastnoise.noisy_layers(model)]


class _Count:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = noise_gen.noisy_weights_multi

        def wrapped(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(noise_gen, "noisy_weights_multi", wrapped)


def _forbid_own_paths(monkeypatch):
    """Inside pregenerated, layers must not run their own noisy op."""
    from fastnoise import modules

    def boom(*a, **k):
        raise AssertionError("a layer ran its own noisy op instead of its pregenerated weights")

    monkeypatch.setattr(modules, "noisy_conv2d", boom)
    monkeypatch.setattr(modules, "noisy_linear", boom)


@pytest.mark.slow
def test_draws_match_and_generate_once_per_draw(monkeypatch):
    model = _model().eval()
    x = _x()
    with torch.inference_mode():
        want = {}
        for k in (0, 1):
            with fastnoise.noise(draw=k):
                want[k] = model(x)
        assert not torch.allclose(want[0], want[1])
        count = _Count(monkeypatch)
        _forbid_own_paths(monkeypatch)
        with pregenerated(model):
            for k in (0, 1):
                with fastnoise.noise(draw=k):
                    for _ in range(3):  # a pass over three batches: one generation
                        got = model(x)
                        torch.testing.assert_close(got, want[k], rtol=1e-5, atol=1e-5)
        assert count.calls == 2  # one per draw (all layers share dtype and mode)
    assert _counters(model) == [0, 0, 0, 0]  # draws do not advance the counters


@pytest.mark.slow
def test_training_counters_advance_the_same_way(monkeypatch):
    """Counter offsets: fresh noise per forward, counters as without pregeneration."""
    model = _model()
    x = _x()
    with torch.no_grad():
        want = [model(x), model(x)]
        assert _counters(model) == [2, 2, 2, 2]
        for _, m in fastnoise.noisy_layers(model):
            m.noise_calls.zero_()
        count = _Count(monkeypatch)
        _forbid_own_paths(monkeypatch)
        with pregenerated(model):
            got = [model(x), model(x)]
    assert _counters(model) == [2, 2, 2, 2]
    assert count.calls == 2  # one per forward
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_bit_identical_to_the_layers_without_triton(monkeypatch):
    """Without Triton on the device the buffers come from the generator the layers use (the C++
    kernels on the CPU, else the reference): results are exact."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model().to("cpu").eval()
    x = _x().cpu()
    with torch.inference_mode(), fastnoise.noise(draw=4):
        want = model(x)
        with pregenerated(model):
            got = model(x)
    assert torch.equal(got, want)


def test_layers_that_need_gradients_run_their_own_path():
    model = _model()
    x = _x()
    with pregenerated(model):
        y = model(x)
        y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert _counters(model) == [1, 1, 1, 1]


def test_a_layer_called_twice_uses_its_buffer_once():
    conv = fastnoise.Conv2d(4, 4, 3, padding=1, spec=NoiseSpec(0.2)).to(DEVICE)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    x = torch.randn(1, 4, 6, 6, device=DEVICE)
    with torch.no_grad():
        want = model(x)
        conv.noise_calls.zero_()
        with pregenerated(model):
            got = model(x)
    assert int(conv.noise_calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_autocast_buffers_are_in_the_compute_dtype():
    model = _model().eval()
    with torch.inference_mode(), fastnoise.noise(draw=0), torch.autocast(DEVICE, dtype=torch.bfloat16):
        bufs = noisy_weights(model)
        want = model(_x())
        with pregenerated(model):
            got = model(_x())
    assert len(bufs) == 4 and all(w.dtype == torch.bfloat16 for w, _ in bufs.values())
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_noisy_weights_peeks_without_advancing():
    model = _model()
    bufs = noisy_weights(model)
    assert list(bufs) == ["0", "2", "4", "6"]
    assert _counters(model) == [0, 0, 0, 0]
    assert bufs["2"][1] is None  # no bias
    assert bufs["0"][1] is not model[0].bias  # noisy bias
    assert bufs["0"][0].shape == model[0].weight.shape
    model.eval()
    assert noisy_weights(model) == {}  # eval without fastnoise.noise: clean


def test_weights_changed_in_place_are_regenerated():
    model = _model().eval()
    x = _x()
    with torch.inference_mode(), fastnoise.noise(draw=0), pregenerated(model):
        before = model(x)
        model[0].weight.mul_(2.0)
        after = model(x)
    with torch.inference_mode(), fastnoise.noise(draw=0):
        torch.testing.assert_close(after, model(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_pregenerated_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        with pregenerated("resnet"):
            pass


@pytest.mark.slow
def test_a_model_built_in_inference_mode_regenerates_every_forward(monkeypatch):
    """Inference tensors keep no version counter: the draw cache cannot trust them."""
    with torch.inference_mode():
        model = _model().eval()
        x = _x()
        with fastnoise.noise(draw=2):
            want = model(x)
            count = _Count(monkeypatch)
            with pregenerated(model):
                got = [model(x), model(x)]
    assert count.calls == 2
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
