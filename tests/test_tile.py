"""The crossbar tile (issue 19): TileSpec, the op against the reference (forward and every gradient
on the same noise), against aihwkit-lightning's torch path, modes, coverage, clipping, memory."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnoise
from fastnoise import reference, tile_ops
from fastnoise.tile import TileSpec, split_sizes
from fastnoise.tile_ops import tile_linear

try:  # the anchor: pip install --no-deps aihwkit-lightning (pure Python)
    os.environ.setdefault("AIHWKIT_TESTING", "1")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line when Triton is unusable
        from aihwkit_lightning.nn import AnalogConv2d, AnalogLinear
        from aihwkit_lightning.simulator.configs import (
            TorchInferenceRPUConfig,
            WeightClipType,
            WeightNoiseInjectionType,
            WeightQuantizationType,
        )
    HAVE_AIHWKIT = True
except Exception:  # noqa: BLE001 - any failure to import means: no anchor here
    HAVE_AIHWKIT = False

needs_aihwkit = pytest.mark.skipif(not HAVE_AIHWKIT, reason="aihwkit-lightning is not installed "
                                   "(pip install --no-deps aihwkit-lightning)")

FULL = TileSpec(max_input_size=16, inp_bits=8, out_bits=8, out_bound=6.0, bound_per_channel=True,
                out_noise=0.05, init_from_data=0)


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


# ----------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("kw, text", [
    ({"inp_bits": 1}, "inp_bits must be >= 2, got 1"),
    ({"out_bits": 0, "out_bound": 1.0}, "out_bits must be >= 2, got 0"),
    ({"inp_res": 1.5}, "inp_res must be >= 2 steps (2 bits), got 1.5"),
    ({"out_bound": 0.0}, "out_bound must be > 0, got 0.0"),
    ({"out_bound": -3}, "out_bound must be > 0, got -3"),
    ({"input_range_init": 0.0}, "input_range_init must be > 0, got 0.0"),
    ({"max_input_size": 0}, "max_input_size (the tile size) must be >= 1, got 0"),
    ({"out_res": 254}, "out_res=254 (ADC quantization) needs out_bound"),
    ({"clip": "fixed"}, "clip='fixed' needs clip_value"),
    ({"clip": "gauss"}, "got 'gauss'"),
    ({"inp_bits": 8, "input_range": False}, "inp_res is relative to the input range"),
    ({"inp_bits": 8, "inp_res": 200}, "inp_bits=8 and inp_res=200 disagree"),
])
def test_spec_errors_name_the_value(kw, text):
    with pytest.raises(ValueError) as e:
        TileSpec(**kw)
    assert text in str(e.value)


def test_spec_bits_are_steps_and_split_is_balanced():
    t = TileSpec(inp_bits=8, out_bits=6, out_bound=10)
    assert (t.inp_res, t.out_res) == (254.0, 62.0)
    assert t.replace(inp_res=30).inp_res == 30 and t.replace(inp_bits=4).inp_res == 14
    assert split_sizes(1000, 512) == [500, 500] and split_sizes(41, 16) == [14, 14, 13]
    assert split_sizes(7, None) == [7] and split_sizes(7, 7) == [7]


def test_input_range_must_be_positive_and_per_tile():
    w, x = torch.randn(5, 41), torch.randn(3, 41)
    with pytest.raises(ValueError, match=r"input_range must be > 0, got \[1.0, 0.0, 1.0\]"):
        tile_linear(x, w, None, torch.tensor([1.0, 0.0, 1.0]), FULL)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        tile_linear(x, w, None, torch.ones(2), FULL)


# ----------------------------------------------------------------------------- against the reference
HAVE_CPP = tile_ops._kernels(torch.zeros(1)) is not None


@pytest.fixture(params=["cpp", "torch"])
def stages(request, monkeypatch):
    """The tile's elementwise stages in C++ (``csrc/ops/cpu/tile_cpu.cpp``) or in PyTorch (CUDA,
    bfloat16 / float16, or no C++ build)."""
    if request.param == "torch":
        monkeypatch.setattr(tile_ops, "_kernels", lambda x: None)
    elif not HAVE_CPP:
        pytest.skip("the C++ CPU kernels are not built")
    return request.param


def _ranges(t):
    return (torch.rand(t, dtype=torch.float64) + 0.6)


@pytest.mark.parametrize("tile", [
    FULL,
    FULL.replace(bound_per_channel=False, out_noise_per_channel=True, max_input_size=None),
    TileSpec(max_input_size=9, inp_bits=6, out_noise=0.1, init_from_data=0),  # no ADC: one matmul
    TileSpec(max_input_size=20, init_from_data=0, decay=0.0),  # tiling and input clipping only
], ids=["full", "one-tile-per-tensor-bound", "dac-noise-no-adc", "clip-only"])
@pytest.mark.parametrize("spec", [fastnoise.NoiseSpec(eta=0.05, scale="absmax_per_channel", noise_bias=True),
                                  None], ids=["wnoise", "no-wnoise"])
def test_forward_and_gradients_equal_reference_float64(tile, spec, stages):
    n, k, m = 23, 41, 17
    w = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    x = (torch.randn(2, m, k, dtype=torch.float64) * 1.3).requires_grad_()
    t = len(tile.sizes(k))
    r = _ranges(t).requires_grad_()
    seed, offset = 1234, 7
    y = tile_linear(x, w, b, r, tile, spec, seed, offset)
    sigma = spec.sigma(w, b) if spec is not None else torch.zeros(1)
    mode = spec.mode if spec is not None else 0
    wn = spec is not None
    ref = reference.tile_linear_forward(x.detach(), w, b, r, tile, sigma, mode, wn and spec.noise_bias, seed,
                                        offset, weight_noise=wn)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    dx, dw, db, dr = reference.tile_linear_backward(g, x.detach(), w, r, tile, sigma, mode, seed, offset,
                                                    weight_noise=wn)
    torch.testing.assert_close(x.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, db, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.grad, dr, rtol=1e-12, atol=1e-12)
    # the stages did something: the ADC clipped some outputs, the input clip some inputs
    if tile.out_bound is not None:
        clean = F.linear(x.detach(), w.detach(), b.detach())
        assert not torch.allclose(y, clean, atol=1e-3)
    assert (x.grad == 0).any() and r.grad.abs().sum() > 0


@pytest.mark.parametrize("tile", [FULL, FULL.replace(bound_per_channel=False, out_noise_per_channel=True),
                                  FULL.replace(out_res=None, out_bits=None)],
                         ids=["full", "per-tensor-bound", "bound-no-adc-steps"])
def test_float32_stages_equal_reference(tile, stages):
    """float32, where each stage's rounding shows (the DAC's and ADC's round half to even at 2**23,
    the float instantiation of the C++ loops): output and every gradient against the float32
    reference on the same noise; with ADC steps nearly all outputs to the bit (a level apart
    would show; without them the matmuls' blocking shows in the last bit)."""
    n, k, m = 37, 41, 29
    torch.manual_seed(3)
    w = (torch.randn(n, k) * 0.1).requires_grad_()
    b = torch.randn(n, requires_grad=True)
    x = (torch.randn(m, k) * 1.5).requires_grad_()
    r = torch.tensor([0.9, 1.3, 0.7], requires_grad=True)
    spec = fastnoise.NoiseSpec(eta=0.05, scale="absmax_per_channel", noise_bias=True)
    y = tile_linear(x, w, b, r, tile, spec, 77, 5)
    sigma = spec.sigma(w, b)
    ref = reference.tile_linear_forward(x.detach(), w, b, r, tile, sigma, spec.mode, True, 77, 5)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    if tile.out_res is not None:
        assert (y == ref).double().mean() > 0.99
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    y.backward(g)
    want = reference.tile_linear_backward(g, x.detach(), w, r, tile, sigma, spec.mode, 77, 5)
    for name, got, exp in zip(("dx", "dW", "db", "dr"), (x.grad, w.grad, b.grad, r.grad), want, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5, msg=name)
    assert (x.grad == 0).any() and (r.grad != 0).all()  # inputs clipped, every range learns


def test_strided_input_and_empty_batch(stages):
    """A transposed input (columns not contiguous) and a batch of 0 rows, forward and gradients."""
    n, k, m = 9, 41, 13
    w = torch.randn(n, k, dtype=torch.float64, requires_grad=True)
    r = _ranges(3).requires_grad_()
    x = (torch.randn(k, m, dtype=torch.float64) * 1.3).t().requires_grad_()
    assert x.stride(-1) != 1
    y = tile_linear(x, w, None, r, FULL, None, 3, 1)
    ref = reference.tile_linear_forward(x.detach(), w, None, r, FULL, torch.zeros(1), 0, False, 3, 1,
                                        weight_noise=False)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    dx, dw, _, dr = reference.tile_linear_backward(g, x.detach(), w, r, FULL, torch.zeros(1), 0, 3, 1,
                                                   weight_noise=False)
    for got, want in ((x.grad, dx), (w.grad, dw), (r.grad, dr)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    e = torch.zeros(0, k, dtype=torch.float64, requires_grad=True)
    y = tile_linear(e, w, None, r, FULL, fastnoise.NoiseSpec(0.05), 3, 1)
    assert y.shape == (0, n)
    y.sum().backward()
    assert e.grad.shape == (0, k)


@pytest.mark.parametrize("scale", ["absmax", "absmax_per_channel"])
@pytest.mark.parametrize("noise_bias", [False, True], ids=["w", "w+b"])
def test_training_sigma_from_the_tiles_maxima_is_spec_sigma(scale, noise_bias, stages):
    """A training call takes sigma from the per-tile max|W| the ADC needs anyway: the value of
    ``spec.sigma``; a weight with a NaN gets ``spec.sigma``'s (which warns) instead."""
    spec = fastnoise.NoiseSpec(eta=0.03, scale=scale, noise_bias=noise_bias)
    w, b = torch.randn(23, 41), torch.randn(23) * 3
    kernels = tile_ops._kernels(w)
    wmax = tile_ops._wmax(w, FULL.sizes(41), torch.float32, kernels)
    assert torch.equal(wmax, reference.tile_wmax(w, FULL.sizes(41)))
    assert torch.equal(tile_ops._sigma_from_wmax(spec, wmax, b), spec.sigma(w, b))
    w[3, 5] = math.nan
    wmax = tile_ops._wmax(w, FULL.sizes(41), torch.float32, kernels)
    assert torch.isnan(wmax[0, 3]) and not torch.isnan(wmax[1:, 3]).any()
    assert tile_ops._sigma_from_wmax(spec, wmax, b) is None


def test_output_noise_is_the_contract_stream_5():
    """Output noise only (no clipping or ADC): y - y_without = out_noise/sqrt(T) * r * max|W| * z."""
    tile = TileSpec(max_input_size=16, out_noise=0.2, init_from_data=0)
    n, k, m = 9, 41, 6
    w, x = torch.randn(n, k, dtype=torch.float64), torch.randn(m, k, dtype=torch.float64)
    r = torch.full((3,), 50.0, dtype=torch.float64)
    y = tile_linear(x, w, None, r, tile, None, 99, 3)
    y0 = tile_linear(x, w, None, r, tile, None, 99, 3, out_noise=False)
    z = reference.tile_out_normals(99, 3, 3, m, n).double()
    wmax = reference.tile_wmax(w, tile.sizes(k)).amax(1)  # per tile, whole tile
    expect = sum(0.2 / math.sqrt(3) * 50.0 * wmax[t] * z[t] for t in range(3))
    torch.testing.assert_close(y - y0, expect, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_dtypes_close_to_reference(dtype):
    tile = FULL
    n, k, m = 23, 41, 33
    w = torch.randn(n, k, dtype=dtype, requires_grad=True)
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    r = torch.rand(3).add(0.6).to(dtype).requires_grad_()
    spec = fastnoise.NoiseSpec(eta=0.03, scale="absmax_per_channel")
    y = tile_linear(x, w, None, r, tile, spec, 5, 1)
    ref = reference.tile_linear_forward(x.detach().double(), w.double(), None, r.double(), tile,
                                        spec.sigma(w), spec.mode, False, 5, 1)
    same = reference.tile_linear_forward(x.detach(), w, None, r, tile, spec.sigma(w), spec.mode, False, 5, 1)
    assert y.dtype == same.dtype == dtype
    # the project's rule: the op's error against the float64 reference at most 2x that of the same
    # computation in PyTorch in the same dtype (mean, as a DAC / ADC level may flip either way)
    err, err_torch = (y.double() - ref).abs().mean(), (same.double() - ref).abs().mean()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    assert (y == same).double().mean() > 0.9
    y.float().sum().backward()
    assert torch.isfinite(w.grad.float()).all() and torch.isfinite(r.grad.float()).all()


def test_nothing_weight_sized_saved_for_backward():
    n, k, m = 96, 64, 8
    layer = fastnoise.Linear(k, n, tile=FULL.replace(max_input_size=32)).train()
    x = torch.randn(m, k, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    big = [t for t in saved if t.numel() >= layer.weight.numel()]
    assert saved and all(t.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()
                         for t in big), [tuple(t.shape) for t in big]
    assert layer.input_range.grad is not None


# ----------------------------------------------------------------------------- modes
def test_modes_eval_clean_train_chip_eta0_keeps_tile():
    tile = TileSpec(max_input_size=16, inp_bits=6, out_bits=6, out_bound=4.0, out_noise=0.05,
                    init_from_data=0)
    layer = fastnoise.Linear(41, 13, spec=fastnoise.NoiseSpec(eta=0.05), tile=tile)
    x = torch.randn(7, 41) * 2
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    r = layer.input_range
    with torch.no_grad():
        with fastnoise.noise(eta=0.0):
            spec, seed, off = layer._noise_args(advance=False, chip=True)
            y0 = layer(x)
        ref0 = reference.tile_linear_forward(x, layer.weight, layer.bias, r, tile, torch.zeros(1), 0, False,
                                             seed, int(off), weight_noise=False)
        torch.testing.assert_close(y0, ref0)
        assert not torch.allclose(y0, F.linear(x, layer.weight, layer.bias), atol=1e-3)
        layer.train()
        spec, seed, off = layer._noise_args(advance=False, chip=True)
        y1 = layer(x)
        ref1 = reference.tile_linear_forward(x, layer.weight, layer.bias, r, tile, spec.sigma(layer.weight),
                                             spec.mode, False, seed, int(off))
        torch.testing.assert_close(y1, ref1, rtol=1e-4, atol=1e-4)
        with fastnoise.noise(enabled=False):
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_input_range_init_from_data_and_static():
    tile = TileSpec(max_input_size=16, init_from_data=2, init_std_alpha=3.0, learn_input_range=False)
    layer = fastnoise.Linear(41, 5, tile=tile).train()
    assert not layer.input_range.requires_grad
    xs = [torch.randn(8, 41) * s for s in (1.0, 2.0, 4.0)]
    for x in xs:
        layer(x)
    sizes = tile.sizes(41)
    for t, (a, n) in enumerate(zip([0, 14, 28], sizes, strict=True)):
        expect = (3 * xs[0][:, a:a + n].std() + 3 * xs[1][:, a:a + n].std()) / 2  # the first two only
        torch.testing.assert_close(layer.input_range[t], expect)
    assert layer.input_range_update_idx.tolist() == [2, 2, 2]
    assert "input_range" in layer.state_dict() and "input_range_update_idx" in layer.state_dict()
    kept = layer.input_range.detach().clone()
    layer.set_tile(tile.replace(out_noise=0.1))  # another spec, as many tiles: the ranges stay
    assert torch.equal(layer.input_range.detach(), kept)
    assert layer.input_range_update_idx.tolist() == [2, 2, 2]
    layer.set_tile(tile.replace(max_input_size=30))  # two tiles: fresh ranges
    assert layer.input_range.tolist() == [3.0, 3.0]


# ----------------------------------------------------------------------------- convert, coverage, clipping
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(64, 5)
        self.side = nn.Linear(5, 5)
        self.attn = nn.MultiheadAttention(5, 1, batch_first=True)

    def forward(self, x):
        h = self.fc(self.conv(x).flatten(1))
        h = F.linear(h, self.side.weight, self.side.bias)  # a use outside the module's forward
        return self.attn(h[:, None], h[:, None], h[:, None])[0][:, 0]


def test_convert_reaches_linear_conv_and_functional_uses_and_names_the_rest():
    model = _Net()
    tile = TileSpec(max_input_size=20, inp_bits=8, out_bits=8, out_bound=8.0, init_from_data=0)
    with pytest.warns(fastnoise.CoverageWarning, match=r"attn.in_proj_weight: a MultiheadAttention"):
        fastnoise.convert(model, fastnoise.NoiseSpec(eta=0.02), tile=tile)
    for m in (model.conv, model.fc, model.side, model.attn.out_proj):
        assert m.tile == tile and m.input_range.shape == (len(tile.sizes(m.weight[0].numel())),)
    x = torch.randn(2, 3, 4, 4)
    model.train()
    model(x).sum().backward()
    assert model.side.input_range.grad is not None and model.conv.input_range.grad is not None
    assert "tile linear" in model.side.noise_uses["weight"]
    fastnoise.restore(model)
    assert "input_range" not in dict(model.named_parameters(recurse=True)).keys()
    assert not any(k.endswith("input_range") for k in model.state_dict())


@pytest.mark.parametrize("clip", ["sigma", "sigma_per_channel", "fixed"])
def test_clip_weights(clip):
    layer = fastnoise.Linear(40, 6, tile=TileSpec(clip=clip, clip_sigma=1.5, clip_value=0.05))
    w = layer.weight.detach().clone()
    fastnoise.clip_weights(layer)
    if clip == "fixed":
        b = torch.tensor(0.05)
    elif clip == "sigma":
        b = 1.5 * w.std()
    else:
        b = 1.5 * w.std(dim=1, keepdim=True)
    torch.testing.assert_close(layer.weight.detach(), torch.maximum(torch.minimum(w, b), -b))
    assert not torch.equal(layer.weight.detach(), w)


def test_trainer_clips_after_each_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    tile = TileSpec(clip="fixed", clip_value=0.01, init_from_data=0)
    fastnoise.convert(model, fastnoise.NoiseSpec(eta=0.02), tile=tile)
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 4, (64,))
    data = torch.utils.data.TensorDataset(x, y)
    from fastnoise.train import fit

    fit(model, data, None, epochs=1, batch_size=32, messages=lambda m: None, optim={"lr": 0.5},
        log={"every": 1, "progress": False})
    assert model[1].weight.detach().abs().max() <= 0.01 + 1e-7


# ----------------------------------------------------------------------------- from_aihwkit_lightning
def _fake_config(**over):
    """A stand-in with aihwkit-lightning's field names (for machines without it)."""
    ir = SimpleNamespace(fast_mode=False, act_range_momentum=0.95, enable=True, dynamic=False,
                         learn_input_range=True, init_value=3.0, init_from_data=100, init_std_alpha=3.0,
                         decay=0.001, input_min_percentage=0.95)
    cfg = SimpleNamespace(
        forward=SimpleNamespace(inp_res=254, out_noise=0.0, out_noise_per_channel=False, out_bound=14.0,
                                out_res=254),
        clip=SimpleNamespace(sigma=2.5, type="LayerGaussianPerChannel"),
        modifier=SimpleNamespace(std_dev=0.03, res=0.0, enable_during_test=False, type="None",
                                 noise_type="AddNormalPerChannel", quantization_type="None"),
        mapping=SimpleNamespace(max_input_size=512),
        pre_post=SimpleNamespace(input_range=ir))
    for k, v in over.items():
        sec, name = k.split("__")
        setattr(ir if sec == "ir" else getattr(cfg, sec), name, v)
    return cfg


def test_from_aihwkit_lightning_maps_the_afm_recipe():
    spec, tile = fastnoise.from_aihwkit_lightning(_fake_config())
    assert spec == fastnoise.NoiseSpec(eta=0.03, scale="absmax_per_channel")
    assert tile == TileSpec(max_input_size=512, inp_res=254, out_res=254, out_bound=14.0,
                            bound_per_channel=True, clip="sigma_per_channel", clip_sigma=2.5)


@pytest.mark.parametrize("over, text", [
    ({"modifier__quantization_type": "Discretize"}, "modifier.quantization_type='Discretize'"),
    ({"modifier__type": "DiscretizeAddNormal"}, "modifier.type='DiscretizeAddNormal'"),
    ({"clip__type": "LearnablePerChannel"}, "clip.type='LearnablePerChannel'"),
    ({"ir__dynamic": True}, "pre_post.input_range.dynamic=True"),
    ({"ir__fast_mode": True}, "pre_post.input_range.fast_mode=True"),
    ({"ir__enable": False}, "forward.inp_res=254 needs pre_post.input_range.enable=True"),
    ({"forward__out_bound": 0.0}, "forward.out_res=254 needs forward.out_bound > 0"),
    ({"forward__inp_res": 0.9}, "forward.inp_res=0.9 gives 1.11111 steps"),
])
def test_from_aihwkit_lightning_refuses_what_is_not_implemented(over, text):
    with pytest.raises(ValueError) as e:
        fastnoise.from_aihwkit_lightning(_fake_config(**over))
    assert text in str(e.value)


@needs_aihwkit
def test_from_aihwkit_lightning_unknown_field_in_use():
    cfg = TorchInferenceRPUConfig()
    cfg.forward.some_new_field = 1  # not a dataclass field: ignored, as aihwkit ignores it
    fastnoise.from_aihwkit_lightning(cfg)
    import dataclasses

    @dataclasses.dataclass
    class IO2(type(cfg.forward)):
        ir_drop: float = 0.0

    cfg.forward = IO2(ir_drop=0.5)
    with pytest.raises(ValueError, match=r"forward.ir_drop=0.5 is not implemented"):
        fastnoise.from_aihwkit_lightning(cfg)


# ----------------------------------------------------------------------------- against aihwkit-lightning
def _aihwkit_config(tiles=16, inp=254, out=-1, bound=0.0, clip="None", out_noise=0.0, per_channel_noise=False,
                    init_from_data=0, learn=True, wnoise=0.0):
    c = TorchInferenceRPUConfig()
    c.mapping.max_input_size = tiles
    c.forward.inp_res, c.forward.out_res, c.forward.out_bound = inp, out, bound
    c.forward.out_noise, c.forward.out_noise_per_channel = out_noise, per_channel_noise
    c.clip.type = {"None": WeightClipType.NONE, "tensor": WeightClipType.LAYER_GAUSSIAN,
                   "channel": WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL}[clip]
    c.clip.sigma = 2.5
    ir = c.pre_post.input_range
    ir.enable, ir.init_from_data, ir.learn_input_range, ir.init_value = True, init_from_data, learn, 1.0
    if wnoise:
        c.modifier.noise_type, c.modifier.std_dev = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL, wnoise
    assert c.modifier.quantization_type == WeightQuantizationType.NONE
    return c


CONFIGS = {
    "tiles-only": dict(tiles=16, inp=-1),
    "tiles-dac6": dict(tiles=16, inp=62),
    "dac8-adc8-bound": dict(tiles=-1, inp=254, out=254, bound=3.0),
    "tiles-dac8-adc8-per-channel-bound": dict(tiles=16, inp=254, out=254, bound=3.0, clip="channel"),
    "tiles-bound-only-tensor-clip": dict(tiles=20, inp=254, bound=2.0, clip="tensor"),
    "wide-ranges-decay": dict(tiles=16, inp=254, out=254, bound=3.0),  # few inputs clip: the decay acts
}


@needs_aihwkit
@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_aihwkit_lightning_forward_and_gradients(name):
    cfg = _aihwkit_config(**CONFIGS[name])
    n, k, m = 23, 41, 17
    a = AnalogLinear(k, n, rpu_config=cfg)
    a.input_range.data = torch.rand_like(a.input_range) + (4.5 if name == "wide-ranges-decay" else 0.5)
    spec, tile = fastnoise.from_aihwkit_lightning(cfg)
    assert spec.eta == 0.0
    ours = fastnoise.convert(nn.Sequential(nn.Linear(k, n)), spec, tile=tile)[0]
    with torch.no_grad():
        ours.weight.copy_(a.weight)
        ours.bias.copy_(a.bias)
        ours.input_range.copy_(a.input_range)
    x = torch.randn(3, m, k) * 1.5
    xa, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    a.train()
    ours.train()
    ya, yo = a(xa), ours(xo)
    torch.testing.assert_close(yo, ya, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yo.backward(g)
    for mine, theirs in ((xo.grad, xa.grad), (ours.weight.grad, a.weight.grad), (ours.bias.grad, a.bias.grad),
                         (ours.input_range.grad, a.input_range.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    if name == "wide-ranges-decay":  # the decay's share of the range gradient is there
        assert (ours.input_range.grad > 0.5 * tile.decay * ours.input_range.detach()).all()
    # and the eval-mode chip (inside noise(eta=0)) is the same forward
    a.eval()
    ours.eval()
    with torch.no_grad(), fastnoise.noise(eta=0.0):
        torch.testing.assert_close(ours(x), a(x), rtol=1e-5, atol=1e-5)


@needs_aihwkit
def test_equals_aihwkit_lightning_conv2d_and_init_from_data():
    cfg = _aihwkit_config(tiles=20, inp=254, out=254, bound=4.0, clip="channel", init_from_data=2)
    a = AnalogConv2d(3, 5, 3, padding=1, rpu_config=cfg)
    spec, tile = fastnoise.from_aihwkit_lightning(cfg)
    ours = fastnoise.Conv2d(3, 5, 3, padding=1, spec=spec, tile=tile)
    with torch.no_grad():
        ours.weight.copy_(a.weight)
        ours.bias.copy_(a.bias)
        ours.input_range.copy_(a.input_range)
    for s in (1.0, 3.0, 0.5):
        x = torch.randn(2, 3, 6, 6) * s
        ya, yo = a(x), ours(x)
        torch.testing.assert_close(yo, ya, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.input_range, a.input_range.detach())


@needs_aihwkit
def test_clip_weights_equals_aihwkit_lightning():
    for clip in ("tensor", "channel"):
        cfg = _aihwkit_config(clip=clip)
        a = AnalogLinear(40, 6, rpu_config=cfg)
        _, tile = fastnoise.from_aihwkit_lightning(cfg)
        ours = fastnoise.Linear(40, 6, tile=tile)
        with torch.no_grad():
            ours.weight.copy_(a.weight * 3)
            a.weight.mul_(3)
        a.clip_weights()
        fastnoise.clip_weights(ours)
        torch.testing.assert_close(ours.weight, a.weight, rtol=1e-6, atol=1e-7)


@needs_aihwkit
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_output_noise_statistics_match_aihwkit_lightning(per_channel):
    """In training mode, (noisy - noiseless) output over many elements has the std aihwkit-lightning's
    has, per output channel, and ours is N(0, 1) after dividing by the formula's scale."""
    cfg = _aihwkit_config(tiles=32, inp=-1, out_noise=0.1, per_channel_noise=per_channel)
    n, k, m = 16, 64, 2000
    a = AnalogLinear(k, n, rpu_config=cfg)
    with torch.no_grad():
        a.weight.mul_(torch.linspace(0.2, 2.0, n)[:, None])  # channels of different max|W|
    spec, tile = fastnoise.from_aihwkit_lightning(cfg)
    ours = fastnoise.Linear(k, n, spec=spec, tile=tile)
    with torch.no_grad():
        ours.weight.copy_(a.weight)
        ours.bias.copy_(a.bias)
        ours.input_range.copy_(a.input_range)
    x = torch.randn(m, k)
    with torch.no_grad():
        a.train()
        na = a(x) - a.eval()(x)
        ours.train()  # minus the same tile without output noise (eval mode is the digital model)
        no = ours(x) - tile_linear(x, ours.weight, ours.bias, ours.input_range, tile, None, out_noise=False)
    sa, so = na.std(0), no.std(0)
    assert torch.allclose(so, sa, rtol=0.1), (so, sa)  # 2000 samples per channel: ~1.6% std error
    wmax = reference.tile_wmax(ours.weight, tile.sizes(k))  # [T, N]
    w = wmax if per_channel else wmax.amax(1, keepdim=True).expand_as(wmax)
    r = ours.input_range.detach()
    expect = sum((0.1 / math.sqrt(2) * r[t] * w[t]) ** 2 for t in range(2)).sqrt()  # [N]
    zs = no / expect
    assert abs(zs.mean().item()) < 0.02 and abs(zs.std().item() - 1) < 0.02
    if per_channel:  # the channels differ by their max|W|, as aihwkit-lightning's
        assert so[-1] > 3 * so[0] and sa[-1] > 3 * sa[0]


def test_a_chip_is_fixed_inside_draw_and_differs_between_draws():
    layer = fastnoise.Linear(41, 13, spec=fastnoise.NoiseSpec(eta=0.05), tile=FULL).eval()
    x = torch.randn(5, 41)
    with torch.no_grad():
        with fastnoise.noise(draw=3):
            a, b = layer(x), layer(x)
        with fastnoise.noise(draw=4):
            c = layer(x)
        with fastnoise.noise(draw=3, eta=0.0):  # the same chip's output noise, no weight noise
            d = layer(x)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, d)


def test_autocast_bfloat16_runs_with_float32_parameters():
    layer = fastnoise.Linear(41, 13, tile=FULL).train()
    x = torch.randn(5, 41, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.input_range.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and torch.isfinite(layer.input_range.grad).all()
