"""Host time per noisy layer call, the kernel left out: what fastnoise's Python adds (runs on CPU).

    python -m pytest bench/test_bench_host.py --benchmark-columns=median,iqr,rounds

At batch 1-8 a layer's kernel takes microseconds, so the host's time per call (argument checks,
sigma, counters, dispatch, autograd bookkeeping) decides whether the GPU waits. To measure only
that, the backend that computes the noisy layer is swapped for the clean ``F.linear`` /
``F.conv2d`` (and their gradients), tensors are tiny and torch runs one thread: each median is
then the host cost of one call plus that of the clean op itself, comparable across providers:

- ``clean``: the torch module (``nn.Linear`` / ``nn.Conv2d``);
- ``naive``: the layer people write today, ``W + eta * (max W - min W) * randn_like(W)`` per
  call, then the clean op;
- ``fastnoise``: ``fastnoise.Linear`` / ``Conv2d``; ``eval`` is a no-grad forward under
  ``fastnoise.noise(eta, draw=k)`` (robustness evaluation), ``train`` a forward + backward.

``extra_info["ratio_vs_clean"]`` / ``["ratio_vs_naive"]``: medians of this session, side by side.
"""

import pytest
import torch
import torch.nn.functional as F
from _baselines import Medians, clean_backend_swaps, naive_classes
from torch import nn

import fastnoise

pytestmark = pytest.mark.host  # runs without a GPU (bench/conftest.py)
pytest.importorskip("pytest_benchmark")

ETA = 0.05
MEDIANS = Medians()


@pytest.fixture(autouse=True)
def _clean_kernels(monkeypatch):
    """The CPU backends (the reference and the C++ path) swapped for the clean ops: no noise math
    is timed."""
    for target, name, value in clean_backend_swaps():
        monkeypatch.setattr(target, name, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NaiveLinear, NaiveConv2d = naive_classes(lambda w: ETA * (w.max() - w.min()))  # the range scale


def _layers(kind):
    if kind == "linear":
        args, x = (16, 16), torch.randn(2, 16)
        return {"clean": nn.Linear(*args), "naive": NaiveLinear(*args),
                "fastnoise": fastnoise.Linear(*args)}, x
    args, x = (4, 4, 3), torch.randn(1, 4, 3, 3)
    return {"clean": nn.Conv2d(*args, padding=1), "naive": NaiveConv2d(*args, padding=1),
            "fastnoise": fastnoise.Conv2d(*args, padding=1)}, x


@pytest.mark.parametrize("provider", ["clean", "naive", "fastnoise"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_host_eval_call(benchmark, kind, provider):
    layers, x = _layers(kind)
    layer = layers[provider].eval()

    benchmark.group = f"host {kind} eval (no grad)"
    with torch.no_grad(), fastnoise.noise(eta=ETA, draw=3):  # entered once, as an evaluation does
        benchmark(layer, x)
    MEDIANS.record(benchmark, (kind, "eval"), provider)


@pytest.mark.parametrize("provider", ["clean", "naive", "fastnoise"])
def test_host_train_step_linear(benchmark, provider):
    layers, x = _layers("linear")
    layer = layers[provider].train()
    layer.spec = fastnoise.NoiseSpec(ETA) if provider == "fastnoise" else None
    x = x.requires_grad_()

    def step():
        layer(x).sum().backward()

    benchmark.group = "host linear train (forward + backward)"
    benchmark(step)
    MEDIANS.record(benchmark, ("linear", "train"), provider)


# ----------------------------------------------------------------------------- reaching every use
class _SubclassWeight(nn.Parameter):
    """The alternative to a noise scope that fastnoise.intercept's design note weighs: a weight
    subclass whose ``__torch_function__`` routes ``F.linear`` to the fused op (as torchao's
    quantized weights do). A measurement prototype only: it handles eval calls under a fixed draw."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            owner = w._fastnoise_owner
            spec, seed, offset = owner._noise_args()
            with torch._C.DisableTorchFunctionSubclass():
                return fastnoise.functional.noisy_linear(x, w, b, spec, seed, offset)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _mechanism(provider):
    """One 16 -> 16 linear reached three ways (see the design note in fastnoise/intercept.py)."""
    torch.manual_seed(0)
    if provider == "drop-in":  # fastnoise.Linear: its forward calls the fused op
        return fastnoise.Linear(16, 16)
    if provider == "scope":  # nn.Linear's F.linear seen by a converted model's noise scope
        class Direct(nn.Module):  # uses the child's weight outside the child's forward
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(16, 16)

            def forward(self, x):
                return F.linear(x, self.fc.weight, self.fc.bias)

        return fastnoise.convert(Direct())
    layer = fastnoise.Linear(16, 16)
    weight = _SubclassWeight(layer.weight.detach().clone())
    weight._fastnoise_owner = layer
    layer._parameters["weight"] = weight

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = layer

        def forward(self, x):
            return F.linear(x, self.fc.weight, self.fc.bias)

    return Functional()


@pytest.mark.parametrize("provider", ["drop-in", "scope", "subclass"])
def test_host_reach_a_weight(benchmark, provider):
    """Host time of one noisy eval call, by how fastnoise reaches the weight."""
    model = _mechanism(provider).eval()
    x = torch.randn(2, 16)
    benchmark.group = "host: how an eval call reaches its weight"
    with torch.no_grad(), fastnoise.noise(eta=ETA, draw=3):
        benchmark(model, x)
    MEDIANS.record(benchmark, ("reach",), provider, bases=("drop-in",))


def _mlp(provider):
    torch.manual_seed(0)
    if provider == "layers":  # built from fastnoise layers: no scope
        return nn.Sequential(fastnoise.Linear(16, 16), nn.ReLU(), fastnoise.Linear(16, 16), nn.ReLU(),
                             fastnoise.Linear(16, 4))
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return fastnoise.convert(model) if provider == "converted" else model


@pytest.mark.parametrize("provider", ["clean", "layers", "converted"])
def test_host_scope_of_a_converted_model(benchmark, provider):
    """What the noise scope of a converted model costs per forward (its mode sees the ReLUs; the
    drop-in layers step out of it): a 3-layer MLP eval call, as torch layers, as fastnoise layers
    (no scope) and converted (scope)."""
    model = _mlp(provider).eval()
    x = torch.randn(2, 16)
    benchmark.group = "host: 3-layer MLP eval call (noise scope cost)"
    with torch.no_grad(), fastnoise.noise(eta=ETA, draw=3):
        benchmark(model, x)
    MEDIANS.record(benchmark, ("mlp",), provider, bases=("clean", "layers"))
