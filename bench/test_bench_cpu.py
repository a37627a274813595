"""The CPU path, one thread, providers side by side in one run (pytest-benchmark; runs without a GPU).

    python -m pytest bench/test_bench_cpu.py --benchmark-columns=median,iqr,rounds

Providers (float32, eta 0.05, absmax scale):

- ``clean``: the torch layer / model;
- ``naive``: ``W + eta * max|W| * torch.randn_like(W)`` in every forward (autograd saves the noisy
  weight for the backward);
- ``fastnoise``: ``fastnoise.Linear`` / ``Conv2d`` / ``convert(model)``, ``path="auto"``: the
  C++ generator of ``csrc/`` writes ``W + sigma z``, BLAS / oneDNN multiplies, the backward
  regenerates the noise for dX.

Cases: noise generation of a 1024 x 1024 weight (normals/s, against ``torch.randn_like``, and two
threads against one); Linear 1024 -> 1024 at M in {1, 16, 256, 2048}, forward (no grad, noise on)
and forward + backward (dX, dW, db); Conv2d 64 -> 64 3x3 on 32 x 32 at batch 1 and 32; the
resnet18 (torchvision, 10 classes) SGD train step at 32 x 32, batch 32; the robustness pass
(resnet18 eval, 256 images x 10 draws: ``fastnoise.evaluate_robustness``, with and without
``pregenerate=True``, against 10 naive and 10 clean passes); the live peak memory of a 16-layer
1024-wide MLP train step at batch 256.

``extra_info``: ``ratio_vs_clean`` / ``ratio_vs_naive`` (medians of this session, side by side),
``normals_per_s`` and ``ratio_vs_randn_like`` (rates), ``speedup_vs_1_thread``, ``peak_bytes``.

Live peak memory: the CPU allocator reports every allocation and free to the profiler
(``profile_memory=True``), tensors allocated inside C++ ops included; the peak of their running
sum over one step is the most memory the step held at once beyond what existed before it
(parameters, their ``.grad`` buffers (zeroed, not freed), the input). It counts tensor storage
only (not the allocator's or Python's own). The profiler cannot size the free of a block
allocated before it started, so the step must free nothing older than itself: hence
``zero_grad(set_to_none=False)``, and two profiled steps must agree.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from _baselines import Medians, naive_classes
from torch import nn

import fastnoise
from fastnoise import _cpu, rng

pytestmark = pytest.mark.cpu  # runs without a GPU (bench/conftest.py)
pytest.importorskip("pytest_benchmark")

ETA = 0.05
SPEC = fastnoise.NoiseSpec(ETA, "absmax")
PROVIDERS = ["clean", "naive", "fastnoise"]
MEDIANS = Medians()
_MEDIANS = MEDIANS.by_key  # also for the rows that are not ratios to clean / naive


# ----------------------------------------------------------------------------- providers
NaiveLinear, NaiveConv2d = naive_classes(lambda w: ETA * w.detach().abs().max())  # SPEC's sigma


def _naive(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = NaiveLinear
        elif type(m) is nn.Conv2d:
            m.__class__ = NaiveConv2d
    return model


def _as(provider: str, model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    if provider == "naive":
        return _naive(model)
    if provider == "fastnoise":
        return fastnoise.convert(model, SPEC)
    return model


# ----------------------------------------------------------------------------- noise generation
GEN = (1024, 1024)


def _generators():
    w = torch.randn(GEN) * 0.05
    sigma = SPEC.sigma(w)
    return {
        "randn_like": lambda: torch.randn_like(w),
        "naive_w_plus_sigma_z": lambda: w + ETA * w.abs().max() * torch.randn_like(w),
        "fastnoise_z": lambda: _cpu.normal_grid(7, 3, *GEN),
        "fastnoise_w_plus_sigma_z": lambda: _cpu.noisy_weight(w, sigma, SPEC.mode, 7, 3, torch.float32),
        "reference_z": lambda: rng.normal_grid(7, 3, *GEN),
    }


@pytest.mark.parametrize("provider", list(_generators()))
def test_generation_rate(benchmark, provider):
    if provider.startswith("fastnoise") and not _cpu.available():
        pytest.skip(f"no C++ kernels ({_cpu.why_unavailable()})")
    fn = _generators()[provider]
    benchmark.group = "noise generation 1024 x 1024, 1 thread"
    if provider == "reference_z":
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    else:
        benchmark(fn)
    median = benchmark.stats.stats.median
    benchmark.extra_info["normals_per_s"] = round(GEN[0] * GEN[1] / median)
    _MEDIANS[("gen", provider)] = median
    if provider != "randn_like" and ("gen", "randn_like") in _MEDIANS:
        benchmark.extra_info["ratio_vs_randn_like"] = round(_MEDIANS[("gen", "randn_like")] / median, 3)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("provider", ["randn_like", "fastnoise_z"])
def test_generation_threads(benchmark, provider, threads):
    if provider.startswith("fastnoise") and not _cpu.available():
        pytest.skip(f"no C++ kernels ({_cpu.why_unavailable()})")
    fn = _generators()[provider]
    torch.set_num_threads(threads)
    benchmark.group = f"noise generation 1024 x 1024, {provider}, threads"
    benchmark(fn)
    median = benchmark.stats.stats.median
    benchmark.extra_info["normals_per_s"] = round(GEN[0] * GEN[1] / median)
    _MEDIANS[("threads", provider, threads)] = median
    if threads != 1 and ("threads", provider, 1) in _MEDIANS:
        benchmark.extra_info["speedup_vs_1_thread"] = round(_MEDIANS[("threads", provider, 1)] / median, 3)


# ----------------------------------------------------------------------------- layers
def _layer_step(layer, x, step):
    """The timed call: a forward without grad, or a forward and backward (into x too)."""
    if step == "forward":
        def run():
            with torch.no_grad():
                layer(x)
    else:
        x.requires_grad_()

        def run():
            layer(x).sum().backward()
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("step", ["forward", "forward_backward"])
@pytest.mark.parametrize("m", [1, 16, 256, 2048])
def test_linear_1024(benchmark, m, step, provider):
    layer = _as(provider, nn.Linear(1024, 1024)).train()
    x = torch.randn(m, 1024)
    benchmark.group = f"Linear 1024, M={m}, {step}"
    benchmark(_layer_step(layer, x, step))
    MEDIANS.record(benchmark, ("linear", m, step), provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("step", ["forward", "forward_backward"])
@pytest.mark.parametrize("batch", [1, 32])
def test_conv2d_64x64_3x3(benchmark, batch, step, provider):
    layer = _as(provider, nn.Conv2d(64, 64, 3, padding=1)).train()
    x = torch.randn(batch, 64, 32, 32)
    benchmark.group = f"Conv2d 64->64 3x3 32x32, batch {batch}, {step}"
    benchmark(_layer_step(layer, x, step))
    MEDIANS.record(benchmark, ("conv", batch, step), provider)


# ----------------------------------------------------------------------------- resnet18
def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_resnet18_train_step(benchmark, provider):
    model = _as(provider, _resnet18()).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    benchmark.group = "resnet18 train step, 32x32, batch 32"
    benchmark.pedantic(step, rounds=8, warmup_rounds=2)
    MEDIANS.record(benchmark, ("resnet18", "train"), provider)


DRAWS = 10


@pytest.mark.parametrize("provider", PROVIDERS + ["fastnoise_per_batch"])
def test_resnet18_robustness_pass(benchmark, provider):
    """256 images x 10 draws: fastnoise.evaluate_robustness vs 10 passes of the naive / clean model.

    ``fastnoise`` is evaluate_robustness as it is called by default (``pregenerate=True``: each
    chip's noisy weights generated once per pass); ``fastnoise_per_batch`` passes
    ``pregenerate=False`` (each batch regenerates them; the same results)."""
    model = _as("fastnoise" if provider.startswith("fastnoise") else provider, _resnet18()).eval()
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
              for _ in range(4)]

    if provider.startswith("fastnoise"):
        pregenerate = False if provider == "fastnoise_per_batch" else None

        def run():
            return fastnoise.evaluate_robustness(model, loader, etas=[ETA], draws=DRAWS, progress=False,
                                                 pregenerate=pregenerate)
    else:
        def run():
            correct = 0
            with torch.inference_mode():
                for _ in range(DRAWS):
                    for x, y in loader:
                        correct += (model(x).argmax(1) == y).sum().item()
            return correct

    benchmark.group = "resnet18 eval, 256 images x 10 draws"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    MEDIANS.record(benchmark, ("resnet18", "robustness"), provider)


# ----------------------------------------------------------------------------- live peak memory
def _live_peak_bytes(fn) -> int:
    """Peak of the bytes allocated and not yet freed during one call of ``fn`` (see the docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("provider", PROVIDERS)
def test_mlp16_train_step_peak_memory(benchmark, provider):
    torch.manual_seed(0)
    layers = []
    for _ in range(16):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    model = _as(provider, nn.Sequential(*layers)).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(256, 1024)

    def step():
        opt.zero_grad(set_to_none=False)  # the .grad buffers stay: the step frees nothing older
        model(x).square().mean().backward()
        opt.step()

    step()  # from here on the .grad buffers exist, for every provider
    peaks = [_live_peak_bytes(step) for _ in range(2)]
    assert peaks[0] == peaks[1], peaks  # the same allocations every step
    peak = peaks[0]
    benchmark.group = "MLP 16 x 1024, batch 256, train step (live peak memory)"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    benchmark.extra_info["peak_bytes"] = peak
    _MEDIANS[("mlp16", "peak", provider)] = peak
    for base in ("clean", "naive"):
        other = _MEDIANS.get(("mlp16", "peak", base))
        if other and base != provider:
            benchmark.extra_info[f"peak_ratio_vs_{base}"] = round(peak / other, 3)
    MEDIANS.record(benchmark, ("mlp16", "train"), provider)
