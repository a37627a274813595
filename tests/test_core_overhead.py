"""Per-call eager overhead: sigma kept per weight, int offsets made once, same outputs.

Ops are counted with :func:`fastnoise.testing.count_ops`. Every output is compared bit for bit
with the implementation the layer's ``auto`` call runs (:mod:`fastnoise.reference`, or the C++
CPU kernels when built: ``tests/test_cpu_kernels.py`` compares those with the reference) fed a
sigma computed afresh from the current weights, so a kept sigma that should have been
recomputed fails the comparison as well as the count.
"""

import gc

import pytest
import torch
from torch import nn

import fastnoise
from fastnoise import NoiseSpec, _backends, functional, modules, rng
from fastnoise.testing import count_ops

AMINMAX = "aten.aminmax"
DRAW = 3


def _layer(kind, spec=None):
    if kind == "linear":
        return fastnoise.Linear(41, 13, spec=spec), torch.randn(3, 41)
    return fastnoise.Conv2d(5, 7, 3, padding=1, spec=spec), torch.randn(2, 5, 9, 11)


def _expected(layer, x, spec, draw=DRAW):
    """The layer's output under ``noise(draw=draw)`` with ``spec``, sigma computed afresh."""
    seed = rng.mix64(rng.initial_seed(), layer.noise_id, modules._DRAW_TAG)
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    sigma = spec.sigma(w, b)
    noise_bias = spec.noise_bias and b is not None
    x = x.to(w.dtype)
    if isinstance(layer, fastnoise.Linear):
        return _linear_auto(x, w, b, sigma, spec.mode, noise_bias, seed, draw)
    return _conv_auto(x, w, b, sigma, spec.mode, noise_bias, seed, draw, list(layer.stride),
                      list(layer.padding), list(layer.dilation), layer.groups)


def _linear_auto(x, w, *args):
    """What a layer's ``path="auto"`` forward runs for these tensors."""
    return _backends.linear_impl("auto", x, w).forward(x, w, *args)


def _conv_auto(x, w, b, sigma, mode, noise_bias, seed, offset, *geometry):
    impl = _backends.conv2d_impl("auto", x, w, tuple(geometry))
    return impl.forward(x, w, b, sigma, mode, noise_bias, seed, offset, *geometry)


def _counted(fn):
    """(fn(), the ops it dispatched)."""
    out = []
    ops = count_ops(lambda: out.append(fn()))
    return out[0], ops


def _eval_forward(layer, x, eta=0.05, draw=DRAW, **kw):
    """(output, op counts) of one no-grad eval forward under ``noise(eta, draw=draw)``."""
    with torch.no_grad(), fastnoise.noise(eta=eta, draw=draw, **kw):
        return _counted(lambda: layer(x))


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode", "frozen_params"])
def test_frozen_eval_reduces_weights_once(kind, grad_mode):
    """Second forward and later draws: no aminmax, no offset copy, only the noisy op itself."""
    functional._offset_slots.clear()
    layer, x = _layer(kind)
    layer.eval()
    if grad_mode == "frozen_params":
        layer.requires_grad_(False)
        ctx = torch.enable_grad
    else:
        ctx = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode
    spec = layer.spec.replace(eta=0.05)
    seen = set()
    for i, draw in enumerate([DRAW, DRAW, DRAW + 100, DRAW]):
        with ctx(), fastnoise.noise(eta=0.05, draw=draw):
            y, ops = _counted(lambda: layer(x))
        assert ops[AMINMAX] == (1 if i == 0 else 0), (i, dict(ops))
        # the draw's offset tensor: made once per draw (one host-to-device copy), then kept
        assert ops["aten.lift_fresh"] == (0 if draw in seen else 1), (i, dict(ops))
        seen.add(draw)
        if i > 0:
            assert sum(ops.values()) == 1 + ops["aten.lift_fresh"], dict(ops)  # the noisy op
        assert torch.equal(y, _expected(layer, x, spec, draw))


def _step(optimizer, **kwargs):
    """One optimizer step on made-up gradients (no training forward in between, which would
    drop the kept sigma by itself)."""
    def change(layer):
        opt = optimizer(layer.parameters(), lr=0.5, **kwargs)
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return change


def _load_state_dict(layer):
    state = {k: v * 3 for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)


def _no_grad_mul(layer):
    with torch.no_grad():
        layer.weight.mul_(2)


def _new_parameter(layer):
    layer.weight = nn.Parameter(layer.weight.detach() * 0.5)


def _to_double(layer):
    layer.double()


def _clear_after_data_write(layer):
    layer.weight.data.mul_(2)  # invisible to the version counter ...
    functional.clear_sigma_cache()  # ... hence the documented call


CHANGES = {
    "sgd_step": _step(torch.optim.SGD, momentum=0.9),
    "adamw_foreach_step": _step(torch.optim.AdamW, foreach=True),
    "adam_fused_step": _step(torch.optim.Adam, fused=True),  # bumps no version counter
    "load_state_dict": _load_state_dict,
    "no_grad_mul_": _no_grad_mul,
    "new_parameter": _new_parameter,
    "to_double": _to_double,
    "data_write_then_clear": _clear_after_data_write,
}


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_sigma_recomputed_after_weight_change(kind, change):
    layer, x = _layer(kind)
    layer.eval()
    spec = layer.spec.replace(eta=0.05)
    before, _ = _eval_forward(layer, x)
    _eval_forward(layer, x)  # kept
    CHANGES[change](layer)
    x = x.to(layer.weight.dtype)
    after, ops = _eval_forward(layer, x)
    assert ops[AMINMAX] == 1, dict(ops)
    assert torch.equal(after, _expected(layer, x, spec))
    if change != "to_double":
        assert not torch.equal(after, before)


def test_sigma_recomputed_after_bias_change_with_noise_bias():
    layer, x = _layer("linear", NoiseSpec(0.05, "range", noise_bias=True))
    layer.eval()
    with torch.no_grad():
        layer.bias[0] = 100.0  # the bias sets the range
    _eval_forward(layer, x, eta=None)
    with torch.no_grad():
        layer.bias.mul_(2)
    y, ops = _eval_forward(layer, x, eta=None)
    assert ops[AMINMAX] == 1
    assert torch.equal(y, _expected(layer, x, layer.spec))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sigma_recomputed_when_spec_changes(kind):
    layer, x = _layer(kind)
    layer.eval()
    _eval_forward(layer, x, eta=0.05)
    checks = [  # (noise() arguments, the spec the call must use)
        ({"eta": 0.1}, layer.spec.replace(eta=0.1)),
        ({"eta": 0.1, "scale": "absmax_per_channel"},
         layer.spec.replace(eta=0.1, scale="absmax_per_channel")),
        ({"eta": 0.05}, layer.spec.replace(eta=0.05)),
    ]
    for kw, spec in checks:
        y, ops = _eval_forward(layer, x, **kw)
        assert ops[AMINMAX] == 1, kw
        assert torch.equal(y, _expected(layer, x, spec)), kw
    layer.spec = NoiseSpec(0.2, "absmax")  # the layer's own spec, no override
    y, ops = _eval_forward(layer, x, eta=None)
    assert ops[AMINMAX] == 1
    assert torch.equal(y, _expected(layer, x, layer.spec))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_training_forward_never_reads_kept_sigma(kind):
    """A call that needs the weight's gradient computes sigma afresh (weights written through
    ``.data`` bump no version) and drops the kept one, so evaluation after it recomputes too."""
    layer, x = _layer(kind)
    layer.eval()
    _eval_forward(layer, x)
    layer.weight.data.mul_(3)
    with fastnoise.noise(eta=0.05, draw=DRAW):
        ops = count_ops(lambda: layer(x).sum().backward())
        y = layer(x)
    assert ops[AMINMAX] == 1
    assert torch.equal(y.detach(), _expected(layer, x, layer.spec.replace(eta=0.05)))
    layer.weight.data.mul_(2)  # after a training call: evaluation recomputes
    y, ops = _eval_forward(layer, x)
    assert ops[AMINMAX] == 1
    assert torch.equal(y, _expected(layer, x, layer.spec.replace(eta=0.05)))


@pytest.mark.parametrize("spec", [NoiseSpec(0.07, "range"), NoiseSpec(0.1, "absmax", noise_bias=True),
                                  NoiseSpec(0.1, "absmax_per_channel", noise_bias=True),
                                  NoiseSpec(0.05, "proportional")], ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_counter_mode_outputs_match_the_auto_path(kind, spec):
    """``noise()`` without a draw: each call its own offset, sigma kept, outputs the auto path's."""
    layer, x = _layer(kind, spec)
    layer.eval()
    seed = rng.mix64(rng.initial_seed(), layer.noise_id)
    for call in range(3):
        with torch.no_grad(), fastnoise.noise():
            y, ops = _counted(lambda: layer(x))
        assert ops[AMINMAX] == (1 if call == 0 and spec.scale != "proportional" else 0)
        w, b = layer.weight.detach(), layer.bias.detach()
        sigma = spec.sigma(w, b)
        if kind == "linear":
            want = _linear_auto(x, w, b, sigma, spec.mode, spec.noise_bias, seed, call)
        else:
            want = _conv_auto(x, w, b, sigma, spec.mode, spec.noise_bias, seed, call,
                              [1, 1], [1, 1], [1, 1], 1)
        assert torch.equal(y, want)
    assert int(layer.noise_calls) == 3


def test_kept_values_usable_by_a_later_training_call():
    """sigma and the draw offset kept under inference_mode are normal tensors: a later call that
    saves them for backward (frozen weights, input needing a gradient) works."""
    layer, x = _layer("conv")
    layer.requires_grad_(False)
    with torch.inference_mode(), fastnoise.noise(eta=0.05, draw=DRAW):
        a = layer(x)
    x = x.clone().requires_grad_(True)
    with fastnoise.noise(eta=0.05, draw=DRAW):
        ops = count_ops(lambda: layer(x).sum().backward())
    assert ops[AMINMAX] == 0
    assert x.grad is not None
    assert torch.equal(a, _expected(layer, x.detach(), layer.spec.replace(eta=0.05)))


def test_kept_state_is_small_and_dies_with_the_weights():
    layers = [_layer("linear")[0].eval() for _ in range(3)]
    for layer in layers:
        _eval_forward(layer, torch.randn(2, 41))
        _eval_forward(layer, torch.randn(2, 41), eta=0.1)  # one slot per weight, not per spec
    ids = [id(layer.weight) for layer in layers]
    for i, layer in zip(ids, layers, strict=True):
        ref, _, _, sigma = functional._sigma_slots[i]
        assert ref() is layer.weight
        assert sigma.numel() == 1  # [1] (or [out] per channel), never weight-sized
    del layers, layer
    gc.collect()
    assert not set(ids) & set(functional._sigma_slots)


def test_int_offsets_become_tensors_once_and_the_store_is_bounded():
    w = torch.randn(13, 41)
    first = functional._offset_tensor(DRAW, w.device)
    assert functional._offset_tensor(DRAW, w.device) is first
    assert first.dtype == torch.int64 and first.dim() == 0 and int(first) == DRAW
    for k in range(3 * functional._MAX_OFFSETS):
        assert int(functional._offset_tensor(k, w.device)) == k
    assert len(functional._offset_slots) <= functional._MAX_OFFSETS
    assert int(functional._offset_tensor(2**32 + 5, w.device)) == 5  # the 32-bit call counter


# ----------------------------------------------------------------------------- eager direct calls
class _Passthrough(torch.overrides.TorchFunctionMode):
    """A torch function mode that changes nothing: with it active, calls go through the ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _run(kind, grad):
    torch.manual_seed(0)
    fastnoise.manual_seed(0)  # same layer ids, so the same noise
    layer, x = _layer(kind, NoiseSpec(0.1, noise_bias=True))
    x = x.requires_grad_(grad)
    layer.train(grad)
    layer.requires_grad_(grad)
    with fastnoise.noise(draw=DRAW):
        y = layer(x)
    if not grad:
        return [y]
    y.backward(torch.randn_like(y))
    return [y, x.grad, layer.weight.grad, layer.bias.grad]


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("grad", [False, True], ids=["eval", "train"])
def test_eager_calls_skip_the_op_wrapper_with_the_same_results(kind, grad, monkeypatch):
    """Eager calls on plain tensors run the implementation directly (an autograd.Function when a
    gradient is needed); under a torch function mode they go through ``torch.ops.fastnoise``.
    Both give bit-identical outputs and gradients."""
    with _Passthrough():
        through_op = _run(kind, grad)
    op_name = "_linear_op" if kind == "linear" else "_conv_op"
    op = getattr(functional, op_name)

    def refuse(*args, **kwargs):
        raise AssertionError("the custom op was called in eager mode")

    monkeypatch.setattr(functional, op_name, refuse)
    direct = _run(kind, grad)
    assert len(direct) == len(through_op)
    for a, b in zip(direct, through_op, strict=True):
        assert torch.equal(a, b)
    with _Passthrough(), pytest.raises(AssertionError, match="custom op was called"):
        _run(kind, grad)  # the mode really routes to the op
    monkeypatch.setattr(functional, op_name, op)
    # dispatch modes (count_ops, FakeTensor, tracing) see one op per call
    layer, x = _layer(kind)
    with torch.no_grad(), fastnoise.noise(draw=DRAW):
        ops = count_ops(layer, x)
    assert ops[f"fastnoise.noisy_{'linear' if kind == 'linear' else 'conv2d'}"] == 1


# ----------------------------------------------------------------------------- tracing, fake, 2nd order
def test_fake_tensor_mode_leaves_nothing_behind():
    """A shape/memory estimate under FakeTensorMode (real weights) keeps no fake sigma or offset:
    the next real call returns a real tensor equal to the auto path's."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    fastnoise.manual_seed(0)
    layer, x = _layer("linear")
    layer.eval()
    spec = layer.spec.replace(eta=0.1)
    with torch.no_grad(), fastnoise.noise(eta=0.1, draw=DRAW):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            assert layer(mode.from_tensor(x)).shape == (3, 13)
        y = layer(x)
    assert not isinstance(y, FakeTensor)
    assert not any(isinstance(t, FakeTensor) for t in functional._offset_slots.values())
    assert torch.equal(y, _expected(layer, x, spec))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the offset is a trace constant
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_traced_graphs_compute_sigma_and_call_the_op():
    """make_fx and torch.jit.trace record the op and sigma's reduction, never a kept value."""
    from torch.fx.experimental.proxy_tensor import make_fx

    spec = NoiseSpec(0.1)
    w, x = torch.randn(13, 41), torch.randn(3, 41)

    def f(w, x):
        return functional.noisy_linear(x, w, None, spec, seed=1, offset=2)

    with torch.no_grad():
        f(w, x)  # an eval call keeps sigma for w
        g = make_fx(f)(w, x)
        targets = [str(n.target) for n in g.graph.nodes if n.op == "call_function"]
        assert any("aminmax" in t for t in targets) and any("noisy_linear" in t for t in targets)
        assert torch.equal(g(w * 5, x), f(w * 5, x))
        traced = torch.jit.trace(lambda x: f(w, x), x)
        assert "fastnoise::noisy_linear" in str(traced.graph)
        x2 = torch.randn(3, 41)
        assert torch.equal(traced(x2), f(w, x2))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_double_backward_refuses_on_both_routes(kind):
    """The ops have no second derivative; the eager route must say so too, not return one."""
    for route in ("eager", "op"):
        fastnoise.manual_seed(0)
        layer, x = _layer(kind)
        x = x.requires_grad_()
        ctx = _Passthrough() if route == "op" else torch.enable_grad()
        with ctx:
            (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
            with pytest.raises(RuntimeError, match="no autograd formula"):
                gx.square().sum().backward()


def test_module_dtype_round_trip_forgets_kept_sigma():
    """``.to(bfloat16).float()`` swaps the data without a version bump and may reuse the address:
    the layers' ``_apply`` drops kept sigmas, so the next evaluation call reduces again."""
    layer, x = _layer("linear")
    layer.eval()
    _eval_forward(layer, x)
    assert _eval_forward(layer, x)[1][AMINMAX] == 0  # kept
    layer.to(torch.bfloat16).float()
    out, ops = _eval_forward(layer, x)
    assert ops[AMINMAX] == 1
    assert torch.equal(out, _expected(layer, x, layer.spec.replace(eta=0.05)))
