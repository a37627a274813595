"""The generic path (``fastnoise.functional.noisy_weight`` inside a noise scope) against the float64
reference on the same noise: forward and every gradient, odd shapes, every scale, noise_bias.

For each converted module the test reads, before the forward, the seed and offset each weight
will use (``_noise_wids`` and its counter), builds the noisy weights with
``fastnoise.reference.noisy_weight`` / ``noisy_bias`` in float64, and runs the *unconverted* module
in float64 with them put in straight-through (``W + (Wn - W).detach()``) through
``torch.func.functional_call``. Outputs and the gradients of the inputs, weights and biases must
agree to the dtype's rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _wrappers import MHA, RNNOutput
from torch import nn

import fastnoise
from fastnoise import NoiseSpec, reference, rng
from fastnoise.modules import counter_name

SCALES = ("range", "absmax", "absmax_per_channel", "proportional")
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5),
       torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


class _Raw(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(9, 5) * 0.3)

    def forward(self, x):
        return torch.tanh(x @ self.w.t()) @ self.w[:, :3]


def _hf_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    m = Conv1D(7, 5)
    nn.init.normal_(m.weight, std=0.3)
    nn.init.normal_(m.bias, std=0.1)
    return m


# name -> (module builder, input shapes)
CASES = {
    "conv1d": (lambda: nn.Conv1d(5, 7, 3, padding=1), [(2, 5, 11)]),
    "conv1d-stride-groups": (lambda: nn.Conv1d(6, 9, 4, stride=2, groups=3), [(2, 6, 13)]),
    "conv3d": (lambda: nn.Conv3d(3, 4, (3, 2, 3), padding=1), [(2, 3, 5, 4, 6)]),
    "convtranspose1d": (lambda: nn.ConvTranspose1d(5, 7, 3, stride=2, output_padding=1), [(2, 5, 9)]),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1), [(2, 4, 5, 3)]),
    "convtranspose2d-groups": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), [(2, 4, 5, 5)]),
    "lstm-2layer-bidirectional": (lambda: RNNOutput(nn.LSTM(5, 7, num_layers=2, bidirectional=True)),
                                  [(4, 3, 5)]),
    "lstm-proj": (lambda: RNNOutput(nn.LSTM(5, 7, proj_size=3, batch_first=True)), [(3, 4, 5)]),
    "gru": (lambda: RNNOutput(nn.GRU(5, 7)), [(4, 3, 5)]),
    "rnn-relu": (lambda: RNNOutput(nn.RNN(5, 7, nonlinearity="relu")), [(4, 3, 5)]),
    "lstmcell": (lambda: RNNOutput(nn.LSTMCell(5, 7)), [(3, 5)]),
    "mha-packed": (lambda: MHA(14), [(2, 5, 14)] * 3),
    "mha-kdim-vdim": (lambda: MHA(14, kdim=6, vdim=5), [(2, 5, 14), (2, 3, 6), (2, 3, 5)]),
    "bilinear": (lambda: nn.Bilinear(5, 4, 3), [(3, 5), (3, 4)]),
    "hf-conv1d": (_hf_conv1d, [(2, 3, 5)]),
    "raw-weight-views": (_Raw, [(3, 5)]),
}


def _inputs(shapes, dtype):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def _plan(model, spec):
    """qualified weight name -> (seed, offset, sigma, transposed, bias name or None)."""
    plan = {}
    for hname, h in fastnoise.noisy_layers(model):
        for w in h.noise_weights:
            qual = f"{hname}.{w}" if hname else w
            seed = rng.mix64(rng.initial_seed(), *h._noise_wids[w])
            offset = int(h._buffers[counter_name(w)])
            bname = w.replace("weight", "bias", 1)
            bias = h._parameters.get(bname) if bname != w else None
            transposed = w in h.__dict__.get("noise_transposed", ())
            weight = h._parameters[w]
            view = weight.transpose(0, 1) if transposed else weight
            sigma = spec.sigma(view, bias if spec.noise_bias else None)
            bqual = (f"{hname}.{bname}" if hname else bname) if bias is not None else None
            plan[qual] = (seed, offset, sigma, transposed, bqual)
    return plan


def _reference(base, plan, spec, inputs):
    ref = copy.deepcopy(base).double()
    params = dict(ref.named_parameters())
    subs = {}
    for qual, (seed, offset, sigma, transposed, bqual) in plan.items():
        w = params[qual]
        view = w.detach().transpose(0, 1) if transposed else w.detach()
        wn = reference.noisy_weight(view, sigma, spec.mode, seed, offset, torch.float64)
        wn = wn.transpose(0, 1) if transposed else wn
        subs[qual] = w + (wn - w).detach()  # straight-through
        if spec.noise_bias and bqual is not None:
            b = params[bqual]
            bn = reference.noisy_bias(b.detach(), sigma, spec.mode, seed, offset, torch.float64)
            subs[bqual] = b + (bn - b).detach()
    x = [t.detach().double().requires_grad_() for t in inputs]
    out = torch.func.functional_call(ref, subs, tuple(x))
    return ref, x, out


def _check(case, dtype, spec, autocast=False):
    make, shapes = CASES[case]
    torch.manual_seed(0)
    base = make()
    model = fastnoise.convert(copy.deepcopy(base).to(torch.float32 if autocast else dtype), spec)
    model.train()
    plan = _plan(model, spec)
    assert plan, f"{case}: nothing converted"
    inputs = _inputs(shapes, torch.float32 if autocast else dtype)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out.double() * grad).sum().backward()
    # every noisy weight was drawn exactly once, at the offset read before the forward
    for hname, h in fastnoise.noisy_layers(model):
        for w in h.noise_weights:
            q = f"{hname}.{w}" if hname else w
            used = 2 if case == "raw-weight-views" else 1
            assert int(h._buffers[counter_name(w)]) == plan[q][1] + used, q
    if case == "raw-weight-views":  # the weight is used twice: two draws, offsets 0 and 1
        return _check_raw(model, base, plan, spec, inputs, out, grad, dtype)
    ref, x64, want = _reference(base, plan, spec, inputs)
    (want * grad).sum().backward()
    tol = TOL[torch.bfloat16 if autocast else dtype]
    torch.testing.assert_close(out.double(), want, **tol, msg=lambda m: f"{case} forward: {m}")
    for i, (a, b) in enumerate(zip(inputs, x64, strict=True)):
        torch.testing.assert_close(a.grad.double(), b.grad, **tol,
                                   msg=lambda m, i=i: f"{case} d input {i}: {m}")
    rp = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), rp[name].grad, **tol,
                                   msg=lambda m, n=name: f"{case} d {n}: {m}")


def _check_raw(model, base, plan, spec, inputs, out, grad, dtype):
    seed, offset, sigma, _, _ = plan["w"]
    ref = copy.deepcopy(base).double()
    w = ref.w
    w1, w2 = (w + (reference.noisy_weight(w.detach(), sigma, spec.mode, seed, o, torch.float64) - w).detach()
              for o in (offset, offset + 1))
    x = inputs[0].detach().double().requires_grad_()
    want = torch.tanh(x @ w1.t()) @ w2[:, :3]
    (want * grad).sum().backward()
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(inputs[0].grad.double(), x.grad, **tol)
    torch.testing.assert_close(model.w.grad.double(), w.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_generic_path_matches_reference(case, dtype):
    _check(case, dtype, NoiseSpec(0.08, "absmax"))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", ["conv1d", "convtranspose2d", "lstm-2layer-bidirectional", "mha-kdim-vdim",
                                  "hf-conv1d"])
def test_every_scale_with_noisy_bias(case, scale):
    _check(case, torch.float64, NoiseSpec(0.1, scale, noise_bias=True))


@pytest.mark.parametrize("case", ["conv1d", "mha-packed", "hf-conv1d", "bilinear"])
def test_autocast_bf16(case):
    _check(case, torch.float32, NoiseSpec(0.08, "range"), autocast=True)


def test_noisy_weight_function_straight_through():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    spec = NoiseSpec(0.2, "absmax_per_channel", noise_bias=True)
    wn, bn = fastnoise.functional.noisy_weight(w, b, spec, seed=11, offset=4)
    sigma = spec.sigma(w, b)
    torch.testing.assert_close(wn, reference.noisy_weight(w, sigma, spec.mode, 11, 4), rtol=0, atol=0)
    torch.testing.assert_close(bn, reference.noisy_bias(b, sigma, spec.mode, 11, 4), rtol=0, atol=0)
    g, gb = torch.randn_like(w), torch.randn_like(b)
    ((wn * g).sum() + (bn * gb).sum()).backward()
    assert torch.equal(w.grad, g) and torch.equal(b.grad, gb)  # straight-through
    assert fastnoise.functional.noisy_weight(w, b, NoiseSpec(0.0)) == (w, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        fastnoise.functional.noisy_weight(w, b[:3], spec)
