"""The ResNet-50 training step and robustness evaluation (GPU only; skipped without CUDA).

    python -m pytest bench/test_bench_resnet50.py --benchmark-columns=median,iqr,rounds
    python -m pytest bench/test_bench_resnet50.py -m "slow or not slow"   # batch 256 too

Training step on synthetic ImageNet-shaped data (3x224x224, 1000 classes), bf16 autocast,
channels_last, SGD (see :func:`gpu_conv.make_step`):

- ``clean``: the student alone, no noise (the baseline);
- ``naive_kd``: frozen teacher forward under ``inference_mode`` + student with forward pre-hooks
  ``w + sigma * randn_like(w)`` (:class:`gpu_conv.NaiveWeightNoise`), KD loss (T=6, alpha=0.9);
- ``fastnoise_kd``: the same with ``fastnoise.convert(student, NoiseSpec(0.06, "range"))``;
- ``fastnoise_consistency``: noisy forward + clean forward (noise off, no autograd), CE plus the
  MSE of the layer1..layer4 features.

``extra_info``: images/s, peak memory (MiB) and, once the clean step of the same batch ran in
this session, the time ratio against it. Robustness evaluation (batch 1 or 8): 10 noise draws,
each a pass over ``gpu_conv.BATCHES_PER_DRAW`` batches: naive pre-hooks (noise drawn at every
forward), naive in-place perturbation once per draw, fastnoise ``noise(draw=k)``, the same inside
``fastnoise.pregenerate.pregenerated`` (each draw's weights generated once, in one launch), and
clean forwards for scale (see :func:`gpu_conv.make_robustness`).
"""

import pytest
import torch

try:
    from bench import gpu_conv
except ImportError:  # pytest put bench/ itself on sys.path
    import gpu_conv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark (needs CUDA)")
pytest.importorskip("pytest_benchmark")
pytest.importorskip("torchvision")

_medians: dict = {}  # (test, batch, kind) -> median seconds, for ratios within one session


def _info(benchmark, key, batch, kind, baseline_kind):
    median = benchmark.stats.stats.median
    _medians[(key, batch, kind)] = median
    benchmark.extra_info["images_per_s"] = batch / median
    base = _medians.get((key, batch, baseline_kind))
    if base is not None:
        benchmark.extra_info[f"time_ratio_vs_{baseline_kind}"] = median / base


@pytest.mark.parametrize("batch", [128, pytest.param(256, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", gpu_conv.STEPS)
def test_resnet50_step(benchmark, kind, batch):
    step = gpu_conv.make_step(kind, batch)
    for _ in range(3):  # autotuning, cuDNN plans, allocator warm-up
        step()
    benchmark.extra_info.update({"device": torch.cuda.get_device_name(), "batch": batch, "kind": kind,
                                 "peak_mb": gpu_conv.peak_mb(step)})
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)
    _info(benchmark, "step", batch, kind, "clean")
    if kind == "fastnoise_kd" and ("step", batch, "naive_kd") in _medians:
        benchmark.extra_info["time_ratio_vs_naive_kd"] = (benchmark.stats.stats.median
                                                          / _medians[("step", batch, "naive_kd")])


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("kind", ["naive"] + [k for k in gpu_conv.ROBUSTNESS if k != "naive"])
def test_resnet50_robustness(benchmark, kind, batch):
    run = gpu_conv.make_robustness(kind, batch)
    run()
    benchmark.extra_info.update({"device": torch.cuda.get_device_name(), "batch": batch, "kind": kind,
                                 "draws": gpu_conv.DRAWS, "batches_per_draw": gpu_conv.BATCHES_PER_DRAW})
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    _medians[("eval", batch, kind)] = median
    benchmark.extra_info["images_per_s"] = batch * gpu_conv.DRAWS * gpu_conv.BATCHES_PER_DRAW / median
    naive = _medians.get(("eval", batch, "naive"))
    if naive is not None:
        benchmark.extra_info["time_ratio_vs_naive"] = median / naive
