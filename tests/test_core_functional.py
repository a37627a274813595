"""noisy_linear / noisy_conv2d (reference path) against an explicit float64 computation.

The explicit computation below is written from the contract alone: z from ``rng.normal_grid``
(checked against Philox known answers in test_core_rng), sigma from the scale's formula, the
noisy weight ``W + sigma z`` in float64, gradients by autograd through ``W + (sigma z).detach()``
(straight-through: sigma and z are constants).
"""

import pytest
import torch
import torch.nn.functional as F

from fastnoise import NoiseSpec
from fastnoise.functional import noisy_conv2d, noisy_linear
from fastnoise.rng import STREAM_BIAS, normal_grid

SCALES = ["range", "absmax", "absmax_per_channel", "proportional"]
SEED, OFFSET = 0x1234_5678_9ABC, 5


def explicit_noise(w, b, spec, seed=SEED, offset=OFFSET):
    """(sigma*z for the weight, sigma*z for the bias or None), float64, by the formulas."""
    # the contract computes sigma in float32 from the float32-rounded weight (and bias)
    w2 = w.detach().double().reshape(w.shape[0], -1)
    bb = b.detach().double() if (b is not None and spec.noise_bias) else None
    cols = w2.float() if bb is None else torch.cat([w2, bb[:, None]], 1).float()
    if spec.scale == "range":
        sig_w = ((cols.max() - cols.min()) * spec.eta).double() * torch.ones_like(w2)
    elif spec.scale == "absmax":
        sig_w = (cols.abs().max() * spec.eta).double() * torch.ones_like(w2)
    elif spec.scale == "absmax_per_channel":
        sig_w = (cols.abs().amax(1, keepdim=True) * spec.eta).double() * torch.ones_like(w2)
    else:
        sig_w = torch.tensor(spec.eta, dtype=torch.float32).double() * w2.abs()
    z = normal_grid(seed, offset, w2.shape[0], w2.shape[1]).double()
    dw = (sig_w * z).reshape(w.shape)
    db = None
    if bb is not None:
        zb = normal_grid(seed, offset, 1, bb.shape[0], STREAM_BIAS).double().reshape(-1)
        eta32 = torch.tensor(spec.eta, dtype=torch.float32).double()
        sig_b = eta32 * bb.abs() if spec.scale == "proportional" else sig_w[:, 0]
        db = sig_b * zb
    return dw, db


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _grads(out, inputs, seed=7):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(g.to(out.dtype))
    return [None if t is None else t.grad for t in inputs]


def _compare(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if b is None:
            assert a is None, f"tensor {i}: expected no gradient"
            continue
        assert a is not None, f"tensor {i}: missing gradient"
        err = (a.double() - b).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        assert err <= tol * scale, f"tensor {i}: max error {err:.3g} > {tol * scale:.3g}"


LINEAR_CASES = [  # (input shape, out_features, bias)
    ((3, 41), 17, True),
    ((2, 3, 41), 13, False),
    ((1, 401), 127, True),
    ((7,), 5, True),  # unbatched
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("noise_bias", [False, True], ids=["wnoise", "wbnoise"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}->{c[1]}{'b' if c[2] else ''}")
def test_noisy_linear_matches_explicit(case, scale, noise_bias, dtype, tol):
    shape, n, has_bias = case
    spec = NoiseSpec(0.1, scale, noise_bias)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(n, shape[-1], dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64) if has_bias else None

    xs, ws, bs = _leaves(*(None if t is None else t.to(dtype) for t in (x, w, b)))
    out = noisy_linear(xs, ws, bs, spec, SEED, OFFSET)
    assert out.dtype == dtype
    got = [out.detach()] + _grads(out, [xs, ws, bs])

    dw, db = explicit_noise(w, b, spec)
    xe, we, be = _leaves(x, w, b)
    ref = F.linear(xe, we + dw, None if be is None else (be + db if db is not None else be))
    want = [ref.detach()] + _grads(ref, [xe, we, be])
    _compare(got, want, tol)


CONV_CASES = [  # (N, Cin, H, W, Cout, k, stride, padding, dilation, groups, bias)
    (2, 3, 9, 11, 5, (3, 3), 1, 1, 1, 1, True),
    (1, 4, 10, 7, 6, (3, 2), 2, (2, 0), 1, 2, False),
    (2, 6, 8, 8, 6, (3, 3), 1, 2, 2, 6, True),  # depthwise, dilated
    (1, 5, 13, 13, 7, (1, 1), 2, 0, 1, 1, True),
    (2, 4, 12, 9, 8, (5, 3), (1, 2), (2, 1), (1, 2), 4, False),
]


def _conv_id(c):
    n, ci, h, w, co, k, s, p, d, g, b = c
    return f"{n}x{ci}x{h}x{w}->{co}k{k[0]}{k[1]}s{s}p{p}d{d}g{g}{'b' if b else ''}".replace(" ", "")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("noise_bias", [False, True], ids=["wnoise", "wbnoise"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_noisy_conv2d_matches_explicit(case, scale, noise_bias, dtype, tol):
    n, ci, h, wd, co, k, stride, padding, dilation, groups, has_bias = case
    spec = NoiseSpec(0.08, scale, noise_bias)
    x = torch.randn(n, ci, h, wd, dtype=torch.float64)
    w = torch.randn(co, ci // groups, *k, dtype=torch.float64)
    b = torch.randn(co, dtype=torch.float64) if has_bias else None

    xs, ws, bs = _leaves(*(None if t is None else t.to(dtype) for t in (x, w, b)))
    out = noisy_conv2d(xs, ws, bs, stride, padding, dilation, groups, spec, SEED, OFFSET)
    got = [out.detach()] + _grads(out, [xs, ws, bs])

    dw, db = explicit_noise(w, b, spec)
    xe, we, be = _leaves(x, w, b)
    bias = None if be is None else (be + db if db is not None else be)
    ref = F.conv2d(xe, we + dw, bias, stride, padding, dilation, groups)
    want = [ref.detach()] + _grads(ref, [xe, we, be])
    _compare(got, want, tol)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv_same_padding_even_kernel_and_unbatched():
    spec = NoiseSpec(0.05)
    x = torch.randn(3, 10, 9, dtype=torch.float64)
    w = torch.randn(4, 3, 4, 2, dtype=torch.float64)
    out = noisy_conv2d(x, w, None, 1, "same", 1, 1, spec, SEED, OFFSET)
    dw, _ = explicit_noise(w, None, spec)
    ref = F.conv2d(x, w + dw, None, 1, "same")
    assert out.shape == ref.shape == (4, 10, 9)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_eta_zero_or_no_spec_is_exactly_clean():
    x, w, b = torch.randn(4, 9), torch.randn(6, 9), torch.randn(6)
    assert torch.equal(noisy_linear(x, w, b, NoiseSpec(0.0)), F.linear(x, w, b))
    assert torch.equal(noisy_linear(x, w, b, None), F.linear(x, w, b))


def test_same_seed_same_output_new_offset_new_noise():
    x, w = torch.randn(4, 9), torch.randn(6, 9)
    a = noisy_linear(x, w, None, NoiseSpec(0.1), 3, 0)
    assert torch.equal(a, noisy_linear(x, w, None, NoiseSpec(0.1), 3, 0))
    assert torch.equal(a, noisy_linear(x, w, None, NoiseSpec(0.1), 3, torch.tensor(0)))
    assert not torch.equal(a, noisy_linear(x, w, None, NoiseSpec(0.1), 3, 1))
    assert not torch.equal(a, noisy_linear(x, w, None, NoiseSpec(0.1), 4, 0))


def test_autocast_rounds_noisy_weight_once_to_compute_dtype():
    x, w, b = torch.randn(5, 33), torch.randn(7, 33), torch.randn(7)
    spec = NoiseSpec(0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = noisy_linear(x, w, b, spec, SEED, OFFSET)
    assert out.dtype == torch.bfloat16
    dw, _ = explicit_noise(w, None, spec)
    wn = (w.double() + dw).to(torch.bfloat16)
    ref = F.linear(x.to(torch.bfloat16).double(), wn.double(), b.to(torch.bfloat16).double())
    # both sides use the same bf16 operands; only the accumulation order and output rounding differ
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=2e-2)
