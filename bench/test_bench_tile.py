"""The crossbar tile's cost on the CPU, one thread, providers side by side in one run.

    python -m pytest bench/test_bench_tile.py --benchmark-columns=median,iqr,rounds

The chip: weight noise 0.03 per channel, clipping at 2.5 sigma per channel, 8-bit DAC and ADC,
ADC bound 14, output noise 0.04, tiles of 512 rows, learned input ranges (no initialisation
from data, so every timed call does the same work). Providers:

- ``clean``: ``nn.Linear`` / the torch model;
- ``noisy``: ``fastnoise.Linear`` / ``convert(model, spec)``: the plain noisy layer (weight noise);
- ``tile``: the same with ``tile=TileSpec(...)``: the whole chip;
- ``aihwkit``: aihwkit-lightning's ``AnalogLinear`` / ``convert_to_analog`` (its torch path) with
  the same config (skipped where it is not installed).

Cases: Linear 1024 -> 1024 at M = 256, forward + backward (dX, dW, db, d input_range); the
resnet18 (torchvision, 10 classes) SGD train step at 32 x 32, batch 32 (with the tile, a conv is
the tile op on the unfolded input, as aihwkit-lightning computes it).

``extra_info``: ``ratio_vs_<provider>`` for each provider timed before in the session (the
targets: ``tile`` at most 1.3x ``noisy`` and below 1.0x ``aihwkit``). pytest-benchmark times one
provider after the other, so on a shared machine the ratio follows the load; ``bench/tile_cost.py``
times the Linear case with the providers interleaved in one process.
"""

import contextlib
import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from _baselines import Medians
from torch import nn

import fastnoise
from fastnoise import TileSpec

pytestmark = pytest.mark.cpu  # runs without a GPU (bench/conftest.py)
pytest.importorskip("pytest_benchmark")

SPEC = fastnoise.NoiseSpec(0.03, "absmax_per_channel")
TILE = TileSpec(max_input_size=512, inp_bits=8, out_bits=8, out_bound=14.0, bound_per_channel=True,
                out_noise=0.04, clip="sigma_per_channel", clip_sigma=2.5, init_from_data=0)
PROVIDERS = ["clean", "noisy", "tile", "aihwkit"]
BASES = ("clean", "noisy", "aihwkit")
MEDIANS = Medians()


def _aihwkit():
    os.environ.setdefault("AIHWKIT_TESTING", "1")
    with contextlib.redirect_stdout(io.StringIO()):
        mod = pytest.importorskip("aihwkit_lightning.nn")
        from aihwkit_lightning.nn.conversion import convert_to_analog
        from aihwkit_lightning.simulator.configs import (
            TorchInferenceRPUConfig,
            WeightClipType,
            WeightNoiseInjectionType,
        )
    c = TorchInferenceRPUConfig()
    c.modifier.noise_type, c.modifier.std_dev = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL, 0.03
    c.clip.type, c.clip.sigma = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL, 2.5
    c.forward.inp_res = c.forward.out_res = 254
    c.forward.out_bound, c.forward.out_noise = 14.0, 0.04
    c.mapping.max_input_size = 512
    ir = c.pre_post.input_range
    ir.enable, ir.learn_input_range, ir.init_from_data, ir.init_value = True, True, 0, 3.0
    spec, tile = fastnoise.from_aihwkit_lightning(c)
    assert (spec, tile) == (SPEC, TILE)  # the same chip on both sides
    return mod, convert_to_analog, c


def _as(provider: str, model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    if provider == "noisy":
        return fastnoise.convert(model, SPEC)
    if provider == "tile":
        return fastnoise.convert(model, SPEC, tile=TILE)
    if provider == "aihwkit":
        _, convert_to_analog, cfg = _aihwkit()
        with contextlib.redirect_stdout(io.StringIO()):
            return convert_to_analog(model, cfg)
    return model


@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_1024_m256_forward_backward(benchmark, provider):
    torch.manual_seed(0)
    layer = _as(provider, nn.Sequential(nn.Linear(1024, 1024))).train()
    x = torch.randn(256, 1024, requires_grad=True)

    def run():
        layer(x).sum().backward()

    benchmark.group = "Linear 1024, M=256, forward_backward, 8-bit DAC+ADC, 512-row tiles, output noise"
    benchmark(run)
    MEDIANS.record(benchmark, ("linear",), provider, bases=BASES)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_resnet18_train_step_tile(benchmark, provider):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _as(provider, torchvision.models.resnet18(num_classes=10)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if provider == "tile":
            fastnoise.clip_weights(model)
        elif provider == "aihwkit":
            for m in model.modules():
                if hasattr(m, "clip_weights") and hasattr(m, "rpu_config"):
                    m.clip_weights()

    benchmark.group = "resnet18 train step, 32x32, batch 32 (the chip of the Linear case)"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    MEDIANS.record(benchmark, ("resnet18",), provider, bases=BASES)
