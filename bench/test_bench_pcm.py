"""A PCM evaluation of resnet18 over 10 chips x 4 times: fastnoise's stateless chips against the
naive program-a-copy-per-chip loop (aihwkit's way), time and live peak memory, side by side.

    python -m pytest bench/test_bench_pcm.py --benchmark-columns=median,rounds -s

resnet18 (torchvision, 10 classes), float32, one thread, one batch of 16 images at 32 x 32 per
pass; times 1 s, 1 h, 1 day, 1 year; 10 chips.

- ``fastnoise``: ``fastnoise.evaluate_robustness(model, loader, hardware=PCM(), times=TIMES,
  draws=10)``: each forward computes every layer's effective weight of chip k at t from the
  counter-based streams (programming error, nu, read noise) and runs the clean op; nothing is
  stored per chip or per time.
- ``naive``: for each chip a programmed copy of the model and a nu tensor per weight
  (``torch.randn``), then for each time a drifted, read and compensated copy that is evaluated:
  the same formulas (:class:`fastnoise.PCM`'s own ``prog_std`` / ``drift_stats`` / ``read_std``),
  what aihwkit's ``program_analog_weights`` + ``drift_analog_weights(t)`` keep.

``extra_info``: ``peak_bytes`` (live tensor bytes at the peak of one whole evaluation, torch
profiler, as ``bench/test_bench_cpu.py`` measures it), ``model_bytes``, ``ratio_vs_naive`` (time)
and ``peak_ratio_vs_naive``.
"""

import copy
import math

import pytest
import torch
from _baselines import Medians
from test_bench_cpu import _live_peak_bytes
from torch import nn

import fastnoise
from fastnoise import PCM

pytestmark = pytest.mark.cpu  # runs without a GPU (bench/conftest.py)
pytest.importorskip("pytest_benchmark")

TIMES = [1.0, 3600.0, 86400.0, 3.15e7]
CHIPS = 10
MEDIANS = Medians()
_PEAKS: dict = {}


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _naive_program(pcm, w):
    """(W_p, nu) of a new chip, stored: the programmed copy and one nu per device pair."""
    w = w.reshape(w.shape[0], -1)
    s = pcm.g_max / w.abs().max().clamp(min=1e-7)
    g = torch.stack((w.clamp(min=0), (-w).clamp(min=0))) * s
    gp = (g + pcm.prog_noise_scale * pcm.prog_std(g) * torch.randn_like(g)).clamp(min=0)
    wp = (gp[0] - gp[1]) / s
    mu, sd = pcm.drift_stats(torch.where(wp >= 0, g[0], g[1]))
    return wp, (mu + sd * torch.randn_like(mu)).abs() * pcm.drift_scale


def _naive_drift(pcm, wp, nu, t):
    s2 = pcm.g_max / wp.abs().max().clamp(min=1e-7)
    g = wp.abs() * s2
    gd = g * ((t + pcm.t0) / pcm.t0) ** (-nu)
    gr = (gd + gd.abs() * pcm.read_noise_scale * pcm.read_std(g, t) * torch.randn_like(g)).clamp(min=0)
    wt = torch.where(wp >= 0, gr, -gr) / s2
    return wt * (wp.abs().mean() / wt.abs().mean())


def _top1(model, loader):
    correct = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
    return correct


@pytest.mark.parametrize("provider", ["naive", "fastnoise"])
def test_resnet18_pcm_10_chips_4_times(benchmark, provider):
    base = _resnet18().eval()
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))]
    pcm = PCM()
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())

    if provider == "fastnoise":
        model = fastnoise.convert(copy.deepcopy(base), fastnoise.NoiseSpec(0.05))

        def run():
            return fastnoise.evaluate_robustness(model, loader, hardware=pcm, times=TIMES, draws=CHIPS,
                                                 seed=3, progress=False)
    else:
        names = [n for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

        def run():
            correct = 0
            with torch.inference_mode():
                for _ in range(CHIPS):
                    chip = copy.deepcopy(base)  # the programmed copy of this chip
                    mods = dict(chip.named_modules())
                    state = {n: _naive_program(pcm, mods[n].weight) for n in names}
                    for t in TIMES:
                        drifted = copy.deepcopy(chip)
                        dm = dict(drifted.named_modules())
                        for n in names:
                            w = dm[n].weight
                            w.copy_(_naive_drift(pcm, *state[n], t).reshape(w.shape))
                        correct += _top1(drifted, loader)
                        del drifted
            return correct

    peak = _live_peak_bytes(run)
    benchmark.group = "resnet18 on PCM chips: 10 chips x 4 times, batch 16 at 32x32"
    benchmark.pedantic(run, rounds=2, warmup_rounds=0)
    benchmark.extra_info["peak_bytes"] = peak
    benchmark.extra_info["model_bytes"] = model_bytes
    _PEAKS[provider] = peak
    if provider != "naive" and "naive" in _PEAKS:
        benchmark.extra_info["peak_ratio_vs_naive"] = round(peak / _PEAKS["naive"], 3)
    MEDIANS.record(benchmark, ("pcm",), provider, bases=("naive",))
    print(f"\n{provider}: median {benchmark.stats.stats.median:.2f} s, peak {peak / 2**20:.1f} MiB "
          f"(model {model_bytes / 2**20:.1f} MiB), {dict(benchmark.extra_info)}")
    assert math.isfinite(benchmark.stats.stats.median)
