"""The fused Triton kernel of the crossbar tile (``kernels/tile_matmul.py``) against the reference.

Every case compares the kernel's forward with :func:`fastnoise.reference.tile_linear_forward` on
the same seed and offset (the weight noise of stream 0, drawn in the kernel or read generated;
the output noise of stream 5; the noisy bias of stream 1), on small odd shapes: K = 70 in tiles
of at most 32 is three tiles of 24, 23 and 23 columns, the last starting at column 47 (no
multiple of 8, where the kernel's K blocks must start), and the interpreter's 16 x 16 x 16
blocks cross every tile's edges.
On CPU the kernel runs through the Triton interpreter (tests/conftest.py sets it); on a GPU the
same tests run compiled.

How strict the comparison is (:func:`assert_tile_close`): the kernel rounds to the compute dtype
where the reference's torch ops round and quantizes with the same half-to-even rounding of
IEEE-rounded quotients, so it differs from the reference only by the order of the matmul's sums
(a few float32 ulps of the output scale, ``TIGHT``). A quantizer whose input lies within that
much of a rounding tie (the DAC's, the ADC's, or a 16-bit partial output's rounding) may then go
the other way and move an output by one ADC step of a tile (or one 16-bit ulp). Such an output
is allowed, at most one or 1% of the outputs, and it must differ by no more than one step per
tile. Everything else must agree to ``TIGHT``: in 16-bit that is exactly equal. Under the
interpreter no case has needed the allowance.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastnoise
from fastnoise import NoiseSpec, _backends, reference, tile_ops
from fastnoise.tile import TileSpec
from fastnoise.tile_ops import tile_linear

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"  # CPU: the Triton interpreter (tests/conftest.py)
KERNELS_RUN = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not KERNELS_RUN, reason="no Triton device")
if KERNELS_RUN:
    from fastnoise.kernels import tile_matmul

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPE_IDS = {F32: "f32", BF16: "bf16", F16: "f16"}
SEED, OFFSET = 0x0BAD_CAFE_1234_5678, 9
M, K, N = 5, 70, 9  # three tiles of 24, 23, 23 columns at max_input_size=32
# the matmul's summation order, in units of the dtype's eps times the output scale; 16-bit
# outputs are rounded from float32 sums, so they agree exactly unless a rounding flips
TIGHT = {F32: 16, BF16: 0, F16: 0}

BASE = TileSpec(max_input_size=32, inp_bits=8, out_bits=8, out_bound=3.0, bound_per_channel=True,
                out_noise=0.05, init_from_data=0)
TILES = {
    "no-tiling": BASE.replace(max_input_size=None),
    "tiling-dac8-adc8-channel-noise": BASE,
    "tiling-dac6-adc6-tensor": BASE.replace(inp_bits=6, out_bits=6, bound_per_channel=False, out_noise=0.0),
    "tiling-dac6-adc8-tensor-noise-per-channel": BASE.replace(inp_bits=6, bound_per_channel=False,
                                                              out_noise_per_channel=True),
    "bound-without-quantization": BASE.replace(out_res=None, out_bits=None),
    "dac-noise-no-adc": BASE.replace(out_bound=None, out_res=None, out_bits=None),
    "clip-only": TileSpec(max_input_size=32, init_from_data=0),
    "no-input-range": TileSpec(max_input_size=32, input_range=False, init_from_data=0),
}


@pytest.fixture
def nan_outputs(monkeypatch):
    """The kernel's outputs pre-filled (NaN, and 255 for the masks): an unwritten element fails."""
    def empty(shape, dtype, device):
        fill = 255 if dtype == torch.uint8 else float("nan")
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(tile_matmul, "_empty", empty)


def _inputs(m, k, n, dtype, tile, bias=True, lead=()):
    x = (torch.randn(*lead, m, k, device=DEVICE) * 1.3).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    r = torch.rand(len(tile.sizes(k)), device=DEVICE) + 0.6 if tile.input_range else None
    return x, w, b, r


def _noise(spec, w, b):
    if spec is None:
        return torch.zeros(1, device=w.device), 0, False
    return spec.sigma(w, b), spec.mode, spec.noise_bias


def _adc_steps(tile, w, r, dtype):
    """``sum_t q_t[n]``: how far one flip per tile can move an output (0 without an ADC)."""
    q = tile_matmul.tile_tables(tile, w, r, dtype, w.shape[1])["qstep"]
    return torch.zeros(w.shape[0], device=w.device) if q is None else q.sum(0)


def assert_tile_close(y, ref, steps, name="output"):
    """The rule of the module docstring: all but at most max(1, 1%) of the outputs agree to
    ``TIGHT``; those that do not differ by at most one ADC step per tile plus a dtype ulp."""
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, ref.shape, y.dtype, ref.dtype)
    assert torch.isfinite(y).all(), f"{name}: non-finite values (unwritten elements?)"
    eps = torch.finfo(y.dtype).eps
    scale = max(1.0, ref.double().abs().max().item())
    diff = (y.double() - ref.double()).abs()
    tight = TIGHT[y.dtype] * eps * scale
    off = diff > tight
    allowed = max(1, off.numel() // 100)
    assert off.sum().item() <= allowed, (
        f"{name}: {off.sum().item()} of {off.numel()} outputs differ by more than {tight:.3g} "
        f"(max {diff.max().item():.3g}; at most {allowed} may, by a quantizer's tie)")
    limit = steps.double().reshape(1, -1).expand_as(diff) + 2 * eps * scale
    assert (diff <= limit).all(), (f"{name}: an output differs by {diff.max().item():.3g}, more than one "
                                   f"ADC step per tile ({limit.max().item():.3g})")


def _check(tile, dtype, spec, *, pregenerated=False, out_noise=True, shape=(M, K, N), bias=True):
    m, k, n = shape
    x, w, b, r = _inputs(m, k, n, dtype, tile, bias)
    sigma, mode, noise_bias = _noise(spec, w, b)
    wn = spec is not None
    noisy = _backends.noisy_weight(w, sigma, mode, SEED, OFFSET, dtype) if pregenerated and wn else None
    y, masks = tile_matmul.tile_matmul_fwd(x, w, b, r, tile, sigma, mode, noise_bias, SEED,
                                           torch.tensor(OFFSET, device=DEVICE), weight_noise=wn,
                                           out_noise=out_noise, noisy_weight=noisy)
    ref = reference.tile_linear_forward(x, w, b, r, tile, sigma, mode, noise_bias, SEED, OFFSET,
                                        weight_noise=wn, out_noise=out_noise)
    assert_tile_close(y, ref, _adc_steps(tile, w, r, dtype))
    # the ADC's gradient masks: the reference's 1 / 0.5 / 0 as 2 / 1 / 0
    _, _, _, _, (_, per) = reference._tile_reference(x, w, r, tile, sigma, mode, SEED, OFFSET, wn,
                                                     out_noise)
    if tile.out_bound is None:
        assert masks is None
    else:
        want = torch.stack([(p[3] * 2).to(torch.uint8) for p in per])
        bad = (masks != want).sum().item()
        assert bad <= max(1, want.numel() // 100), f"{bad} of {want.numel()} ADC mask bytes differ"
        assert (want == 0).any() and (want == 2).any(), "the ADC should clip some outputs, not all"
    return y, ref


# ----------------------------------------------------------------------------- the matrix
def _matrix():
    """tile config x dtype; float32 for every config, 16-bit for the full tile (the rest slow)."""
    out = []
    for name, tile in TILES.items():
        for dtype in (F32, BF16, F16):
            quick = dtype == F32 or name == "tiling-dac8-adc8-channel-noise"
            out.append(pytest.param(tile, dtype, id=f"{name}-{DTYPE_IDS[dtype]}",
                                    marks=() if quick else pytest.mark.slow))
    return out


@pytest.mark.parametrize("tile,dtype", _matrix())
def test_forward_matches_reference(tile, dtype, nan_outputs):
    """Weight noise drawn in the kernel (per channel, noisy bias), output noise on."""
    _check(tile, dtype, NoiseSpec(0.05, "absmax_per_channel", noise_bias=True))


@pytest.mark.parametrize("scale", ["range", "absmax_per_channel", "proportional"])
@pytest.mark.parametrize("pregenerated", [False, True], ids=["noise-in-kernel", "noise-generated"])
def test_weight_noise_in_kernel_or_read_generated(scale, pregenerated, nan_outputs):
    """Each noise mode, drawn in the kernel or read from ``noise_gen``'s W + sigma z: the same
    numbers as the reference's noisy weight."""
    _check(BASE, F32, NoiseSpec(0.1, scale, noise_bias=True), pregenerated=pregenerated)


@pytest.mark.parametrize("out_noise", [True, False], ids=["out-noise", "no-out-noise"])
@pytest.mark.parametrize("spec", [None, NoiseSpec(0.05, "absmax")], ids=["no-wnoise", "wnoise"])
def test_output_noise_on_off_and_no_weight_noise(out_noise, spec, nan_outputs):
    _check(BASE, F32, spec, out_noise=out_noise, bias=False)


def test_output_noise_is_stream_5_of_the_contract(nan_outputs):
    """Only the output noise (no clip reached, no DAC or ADC): kernel(out noise) - kernel(without)
    is ``out_noise / sqrt(T) * r_t * wmax_t * z`` summed over tiles, z from ``rng.normal_grid``."""
    tile = TileSpec(max_input_size=32, out_noise=0.2, init_from_data=0)
    x, w, _, _ = _inputs(M, K, N, F32, tile, bias=False)
    r = torch.full((3,), 50.0, device=DEVICE)
    off = torch.tensor(OFFSET, device=DEVICE)
    zero = torch.zeros(1, device=DEVICE)
    y1, _ = tile_matmul.tile_matmul_fwd(x, w, None, r, tile, zero, 0, False, SEED, off, weight_noise=False)
    y0, _ = tile_matmul.tile_matmul_fwd(x, w, None, r, tile, zero, 0, False, SEED, off, weight_noise=False,
                                        out_noise=False)
    z = reference.tile_out_normals(SEED, OFFSET, 3, M, N, DEVICE)
    wmax = reference.tile_wmax(w, tile.sizes(K)).amax(1)
    expect = sum(0.2 / 3**0.5 * 50.0 * wmax[t] * z[t] for t in range(3))
    torch.testing.assert_close(y1 - y0, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_larger_odd_shape_several_blocks_in_m_and_n(dtype, nan_outputs):
    """37 x 150 -> 45: three blocks of 16 in M and N, five crossbar tiles of 30."""
    tile = BASE.replace(max_input_size=30, bound_per_channel=False, out_noise_per_channel=True)
    _check(tile, dtype, NoiseSpec(0.05, "range", noise_bias=True), shape=(37, 150, 45))


def test_leading_dims_and_strides(nan_outputs):
    """A 3-D input (rows from two strides, no copy) and a transposed one give the 2-D result."""
    x, w, b, r = _inputs(M, K, N, F32, BASE, lead=(2,))
    sigma, mode, nb = _noise(NoiseSpec(0.05, "absmax_per_channel", noise_bias=True), w, b)
    off = torch.tensor(OFFSET, device=DEVICE)
    ref = reference.tile_linear_forward(x, w, b, r, BASE, sigma, mode, nb, SEED, OFFSET)
    steps = _adc_steps(BASE, w, r, F32)
    y, _ = tile_matmul.tile_matmul_fwd(x, w, b, r, BASE, sigma, mode, nb, SEED, off)
    assert_tile_close(y, ref.reshape(-1, N), steps, "3-D input")
    xt = x.reshape(-1, K).t().contiguous().t()  # strides (1, 2M)
    y, _ = tile_matmul.tile_matmul_fwd(xt, w, b, r, BASE, sigma, mode, nb, SEED, off)
    assert_tile_close(y, ref.reshape(-1, N), steps, "transposed input")


def test_float32_weight_with_16_bit_input_as_under_autocast(nan_outputs):
    """The weight stays float32 (read in its dtype, rounded to bfloat16 after the noise is added,
    max |W| taken before rounding), the input and the output are bfloat16."""
    x, w, b, r = _inputs(M, K, N, BF16, BASE)
    w, b = w.float() + 1e-3 * torch.randn_like(w.float()), b.float()  # not bf16-representable
    sigma, mode, nb = _noise(NoiseSpec(0.05, "absmax_per_channel", noise_bias=True), w, b)
    y, _ = tile_matmul.tile_matmul_fwd(x, w, b, r, BASE, sigma, mode, nb, SEED,
                                       torch.tensor(OFFSET, device=DEVICE))
    ref = reference.tile_linear_forward(x, w, b, r, BASE, sigma, mode, nb, SEED, OFFSET)
    assert_tile_close(y, ref, _adc_steps(BASE, w, r, BF16))


def test_bad_input_is_refused_naming_the_value():
    x, w, b, r = _inputs(M, K, N, F32, BASE)
    zero, off = torch.zeros(1, device=DEVICE), torch.tensor(0, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        tile_matmul.tile_matmul_fwd(x.double(), w, b, r, BASE, zero, 0, False, 0, off)
    with pytest.raises(ValueError, match="in_features=70, got shape"):
        tile_matmul.tile_matmul_fwd(x[:, :60], w, b, r, BASE, zero, 0, False, 0, off)
    with pytest.raises(ValueError, match="noisy_weight must be torch.float32 of shape"):
        tile_matmul.tile_matmul_fwd(x, w, b, r, BASE, zero, 0, False, 0, off, noisy_weight=w[:, :60])


# ----------------------------------------------------------------------------- through the op
@pytest.fixture
def fused(monkeypatch):
    """tile_linear's forward forced onto the kernel (CPU tensors: the interpreter); the calls counted."""
    calls = []
    real = tile_matmul.tile_matmul_fwd

    def spy(*args, **kwargs):
        calls.append(kwargs.get("noisy_weight") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(tile_ops, "TILE_FORWARD", "fused")
    monkeypatch.setattr(tile_matmul, "tile_matmul_fwd", spy)
    return calls


@pytest.mark.parametrize("rows", [M, 70], ids=["few-rows-noise-in-kernel", "many-rows-noise-generated"])
def test_op_forward_and_gradients_on_the_kernel(fused, rows, monkeypatch):
    """tile_linear with the kernel's forward: output, and the gradients of x, W, b and the ranges
    (the backward reads the kernel's ADC masks) against the reference's. Few rows draw the weight
    noise in the kernel, many read it generated (the linear layer's fused / generate rule)."""
    from fastnoise import _backends_linear

    monkeypatch.setattr(_backends_linear, "FUSED_FP32_NEEDS_TF32", False)  # float32 goes by rows
    tile = BASE
    x, w, b, r = _inputs(rows, K, N, F32, tile)
    spec = NoiseSpec(0.05, "absmax_per_channel", noise_bias=True)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, r)]
    y = tile_linear(*leaves, tile, spec, SEED, OFFSET)
    assert fused == [rows > _backends_linear.FUSED_MAX_M]  # one kernel call, noise where the rule says
    sigma, mode, nb = _noise(spec, w, b)
    ref = reference.tile_linear_forward(x, w, b, r, tile, sigma, mode, nb, SEED, OFFSET)
    assert_tile_close(y.detach(), ref, _adc_steps(tile, w, r, F32))
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    want = reference.tile_linear_backward(g, x, w, r, tile, sigma, mode, SEED, OFFSET)
    for name, a, e in zip(("dx", "dW", "db", "d input_range"), got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()),
                                   msg=lambda s, name=name: f"{name}: {s}")


def test_layer_on_a_tile_trains_the_same_on_kernel_and_composition(monkeypatch):
    """fastnoise.Linear on a tile, one train step's output and gradients: kernel == composition."""
    layer = fastnoise.Linear(K, N, tile=BASE).to(DEVICE).train()
    x = torch.randn(2, M, K, device=DEVICE)
    out = {}
    for how in ("composition", "fused"):
        monkeypatch.setattr(tile_ops, "TILE_FORWARD", how)
        fastnoise.manual_seed(3)
        layer.zero_grad()
        y = layer(x)
        y.square().sum().backward()
        out[how] = [y.detach()] + [p.grad.clone() for p in (layer.weight, layer.bias, layer.input_range)]
    steps = _adc_steps(BASE, layer.weight.detach(), layer.input_range.detach(), F32)
    assert_tile_close(out["fused"][0].reshape(-1, N), out["composition"][0].reshape(-1, N), steps)
    for a, e in zip(out["fused"][1:], out["composition"][1:], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()))


def test_conv_on_a_tile_runs_the_kernel_on_its_unfolded_input(fused, monkeypatch):
    from fastnoise.tile_ops import tile_conv2d

    tile = BASE.replace(max_input_size=20)  # K = 4 * 3 * 3 = 36: two tiles of 18
    x = torch.randn(2, 4, 6, 5, device=DEVICE)
    w = torch.randn(7, 4, 3, 3, device=DEVICE) / 6
    b, r = torch.randn(7, device=DEVICE), torch.rand(2, device=DEVICE) + 0.6
    spec = NoiseSpec(0.05, "absmax_per_channel")
    y = tile_conv2d(x, w, b, 1, 1, 1, 1, r, tile, spec, SEED, OFFSET)
    assert len(fused) == 1  # one kernel call for the whole unfolded input
    monkeypatch.setattr(tile_ops, "TILE_FORWARD", "composition")
    want = tile_conv2d(x, w, b, 1, 1, 1, 1, r, tile, spec, SEED, OFFSET)
    steps = _adc_steps(tile, w.reshape(7, -1), r, F32)
    assert_tile_close(y.permute(0, 2, 3, 1).reshape(-1, 7), want.permute(0, 2, 3, 1).reshape(-1, 7), steps)


def test_tile_forward_setting_is_checked(monkeypatch):
    x, w, b, r = _inputs(M, K, N, F32, BASE)
    monkeypatch.setattr(tile_ops, "TILE_FORWARD", "kernel")
    with pytest.raises(ValueError, match="must be 'auto', 'fused' or 'composition', got 'kernel'"):
        tile_linear(x, w, b, r, BASE)


def test_auto_runs_the_kernel_on_cuda_only_and_float64_never(fused, monkeypatch):
    x, w, b, r = _inputs(M, K, N, F32, BASE)
    monkeypatch.setattr(tile_ops, "TILE_FORWARD", "auto")
    tile_linear(x, w, b, r, BASE, NoiseSpec(0.05, "absmax"))
    from fastnoise import _backends_linear

    assert fused == ([_backends_linear.auto_path(x) != "fused"] if DEVICE == "cuda" else [])
    fused.clear()
    monkeypatch.setattr(tile_ops, "TILE_FORWARD", "composition")
    tile_linear(x, w, b, r, BASE)
    assert fused == []
    monkeypatch.setattr(tile_ops, "TILE_FORWARD", "fused")
    with pytest.warns(RuntimeWarning, match="float64"):
        y = tile_linear(x.double(), w.double(), b.double(), r.double(), BASE)
    assert fused == [] and y.dtype == torch.float64
