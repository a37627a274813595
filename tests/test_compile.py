"""``torch.compile(fullgraph=True)`` on models with noisy layers matches eager.

Same global seed and a freshly built model give the same per-layer seeds and call counters,
so the compiled and the eager model draw the same noise: outputs and gradients must agree to
float32 rounding (inductor may fuse the ReLUs and the loss differently). Several calls before
one backward check that the call counter saved for backward is the one of that call.
"""

import os

import pytest
import torch
from torch import nn

import fastnoise
from fastnoise import NoiseSpec
from fastnoise.functional import noisy_linear

pytestmark = pytest.mark.slow

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _mlp():
    torch.manual_seed(0)
    fastnoise.manual_seed(11)
    return nn.Sequential(
        fastnoise.Linear(12, 24), nn.ReLU(),
        fastnoise.Linear(24, 16, spec=NoiseSpec(0.1, "absmax_per_channel", noise_bias=True)), nn.ReLU(),
        fastnoise.Linear(16, 5, bias=False, spec=NoiseSpec(0.05, "proportional")),
    ).to(DEVICE).train()


def _convnet():
    torch.manual_seed(0)
    fastnoise.manual_seed(12)
    return nn.Sequential(
        fastnoise.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        fastnoise.Conv2d(6, 4, 3, stride=2, spec=NoiseSpec(0.1, "absmax", noise_bias=True)),
        nn.Flatten(), fastnoise.Linear(4 * 3 * 3, 5),
    ).to(DEVICE).train()


def _tile_net():
    """A conv and two linears on crossbar tiles (the conv is the tile op on its unfolded input):
    DAC, ADC with bound, output noise, learned ranges; weight noise in two of them."""
    torch.manual_seed(0)
    fastnoise.manual_seed(13)
    tile = fastnoise.TileSpec(max_input_size=16, inp_bits=8, out_bits=8, out_bound=6.0,
                              bound_per_channel=True, out_noise=0.05, init_from_data=0)
    return nn.Sequential(
        fastnoise.Conv2d(3, 4, 3, padding=1, tile=tile), nn.ReLU(), nn.Flatten(),
        fastnoise.Linear(64, 24, spec=NoiseSpec(0.05, "absmax_per_channel", noise_bias=True), tile=tile),
        nn.ReLU(),
        fastnoise.Linear(24, 5, spec=NoiseSpec(0.0), tile=tile.replace(out_bound=None, out_res=None)),
    ).to(DEVICE).train()


def _run(model, x, fn=None, calls=3):
    """``calls`` forwards of ``fn`` (default: ``model``; fresh noise each), then backward through
    the last two; returns outputs and ``model``'s gradients."""
    fn = fn or model
    ys = [fn(x) for _ in range(calls)]
    (ys[-2].square().sum() + ys[-1].sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return [y.detach() for y in ys], grads


def _compare_eager_and_compiled(build, x):
    eager = build()
    eager_ys, eager_grads = _run(eager, x)
    model = build()
    compiled = torch.compile(model, fullgraph=True)
    ys, grads = _run(model, x, compiled)
    assert not torch.equal(eager_ys[0], eager_ys[1])  # the noise changes per call
    for a, b in zip(ys, eager_ys, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], **TOL, msg=name)
    # the compiled model advanced its call counters like the eager one
    assert fastnoise.noise_state_dict(model) == fastnoise.noise_state_dict(eager)
    assert all(s["calls"] == 3 for s in fastnoise.noise_state_dict(model).values())


def test_compiled_mlp_matches_eager():
    x = torch.randn(7, 12, device=DEVICE)
    _compare_eager_and_compiled(_mlp, x)


def test_compiled_tile_layers_match_eager():
    """``fastnoise::tile_linear`` and its backward are custom ops: the compiled model draws the same
    weight and output noise, and gives the same outputs and gradients (the ranges' too)."""
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    _compare_eager_and_compiled(_tile_net, x)


def test_compiled_convnet_matches_eager():
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    _compare_eager_and_compiled(_convnet, x)


@pytest.mark.skipif(not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"), reason="no Triton device")
@pytest.mark.parametrize("path", ["fused", "generate"])
def test_compiled_kernel_paths_match_eager(path):
    """The custom op running the Triton kernels inside a compiled function, forward and backward."""
    x = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(33, 40, device=DEVICE, requires_grad=True)
    b = torch.randn(33, device=DEVICE, requires_grad=True)
    offset = torch.tensor(4, device=DEVICE)
    spec = NoiseSpec(0.1, "range", noise_bias=True)

    def f(x, w, b, offset):
        return noisy_linear(x, w, b, spec, 1234, offset, path=path).relu().sum()

    want = torch.autograd.grad(f(x, w, b, offset), (x, w, b))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w, b, offset), (x, w, b))
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, **TOL)


def test_compiled_functional_ops_with_spec_built_inside():
    """A NoiseSpec made inside the compiled function (no source for dynamo) traces too."""
    from fastnoise.functional import noisy_conv2d

    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)

    def fn(x, w, b):
        y = noisy_conv2d(x, w, b, padding=1, spec=NoiseSpec(0.1, "absmax_per_channel"), seed=3, offset=2)
        return noisy_linear(y.flatten(1), torch.ones(5, 4 * 8 * 8), None, NoiseSpec(0.05), 4, 1)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, w, b), fn(x, w, b), **TOL)


def test_compiled_eval_draw_follows_weight_changes():
    """Compiled code computes sigma in its graph and keeps nothing between calls: a weight
    changed in place shows in the next compiled call, which matches eager."""
    model = _mlp().eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(7, 12, device=DEVICE)
    with torch.no_grad(), fastnoise.noise(eta=0.05, draw=2):
        a, eager_a = compiled(x), model(x)
        model[0].weight.mul_(3)
        b, eager_b = compiled(x), model(x)
    torch.testing.assert_close(a, eager_a, **TOL)
    torch.testing.assert_close(b, eager_b, **TOL)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- converted models
def _vit():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=24, num_classes=5)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)  # torchvision starts it at zero (sigma 0)
    return model, torch.randn(2, 3, 16, 16)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg), torch.randint(0, 40, (2, 7))


@pytest.mark.parametrize("build", [_vit, _gpt2], ids=["vit", "gpt2"])
def test_compiled_converted_model_matches_eager_on_a_chip(build):
    """The noise scope (a TorchFunctionMode) is traced: MultiheadAttention's in_proj, GPT-2's
    Conv1D weights and the fused layers all draw the chip's noise inside the compiled graph."""
    import warnings

    model, x = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastnoise.CoverageWarning)  # GPT-2's position embedding
        fastnoise.convert(model, NoiseSpec(0.08, "absmax"))
    model.eval()

    def logits(m):
        out = m(x)
        return out.logits if hasattr(out, "logits") else out

    clean = logits(model)
    compiled = torch.compile(model, fullgraph=True)
    for k in (0, 3):
        with fastnoise.noise(draw=k):
            eager = logits(model)
            # another chip is another value of the same graph input: no recompilation
            with torch._dynamo.config.patch(error_on_recompile=k > 0):
                got = logits(compiled)
        assert not torch.allclose(eager, clean)
        torch.testing.assert_close(got, eager, **TOL)
