"""Fashion-MNIST: does training on the crossbar tile help a model that meets the tile?

    python bench/tile_fashion.py [--seeds 3] [--epochs 3] [--train 20000] [--draws 10]
                                 [--bits 8] [--bound 14] [--out-noise 0.04] [--pcm-times 1 86400 3.15e7]

Per seed, one MLP (784-256-10) initialisation, two students trained by ``fastnoise.train.fit``
(method ``noise``, the same data order): ``gaussian`` (weight noise only: absmax per channel,
eta 0.05) and ``tile`` (the same weight noise on the crossbar tile: 196-row tiles, 8-bit DAC and
ADC, bound 14, output noise 0.04, clipping at 2.5 sigma per channel, learned input ranges
initialised from 20 batches). Both are evaluated with the tile on, on the same chips
(``evaluate_on_chips``: chip ``k`` is the same weight and output noise for both, as the layers'
names agree); the Gaussian student's input ranges are first calibrated from 20 training batches
(the tile's initialisation from data, no gradient), as one would calibrate a model before
deploying it. The paired difference (tile - gaussian, per chip) is summarised by its t interval
over the per-seed means (``paired_difference``). Then both again, with their tiles on, on PCM
chips (``fastnoise.PCM()``, the chip's weight through the tile's converters, no Gaussian weight
noise) at ``--pcm-times`` (``evaluate_robustness(hardware=..., seed=1000 + seed)``: the same chips
for both students), paired the same way (``--pcm-times`` with no value: skipped). Needs Debian's
dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import fastnoise
from fastnoise import NoiseSpec, TileSpec
from fastnoise.train import fit
from fastnoise.train.data import FASHION_DEBIAN_ROOT, FashionMNISTDataset
from fastnoise.train.study import evaluate_on_chips, paired_difference

SPEC = NoiseSpec(0.05, "absmax_per_channel")
TILE = TileSpec(max_input_size=196, inp_bits=8, out_bits=8, out_bound=14.0, bound_per_channel=True,
                out_noise=0.04, clip="sigma_per_channel", clip_sigma=2.5, init_from_data=20)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def calibrate(model: nn.Module, loader, batches: int) -> None:
    """The tile's initialisation from data on ``batches`` training batches, without gradients."""
    model.train()
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i == batches:
                break
            model(x)
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bits", type=int, default=8, help="DAC and ADC bits")
    ap.add_argument("--bound", type=float, default=14.0, help="ADC bound (relative to r max|W|)")
    ap.add_argument("--out-noise", type=float, default=0.04)
    ap.add_argument("--pcm-times", type=float, nargs="*", default=[1.0, 86400.0, 3.15e7],
                    help="seconds after programming on PCM chips (none: no PCM evaluation)")
    a = ap.parse_args()
    global TILE
    TILE = TILE.replace(inp_bits=a.bits, out_bits=a.bits, out_bound=a.bound, out_noise=a.out_noise)
    print(f"{SPEC}, {TILE}", flush=True)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    train_all = FashionMNISTDataset(FASHION_DEBIAN_ROOT, train=True)
    test = FashionMNISTDataset(FASHION_DEBIAN_ROOT, train=False)
    g = torch.Generator().manual_seed(0)
    train = Subset(train_all, torch.randperm(len(train_all), generator=g)[: a.train].tolist())
    test_loader = DataLoader(test, batch_size=1000)
    acc: dict = {"gaussian": [], "tile": []}
    pcm: dict = {"gaussian": [], "tile": []}  # [seed][time][chip]
    for seed in range(a.seeds):
        torch.manual_seed(seed)
        init = mlp()
        for name in ("gaussian", "tile"):
            model = copy.deepcopy(init)
            fastnoise.convert(model, SPEC, tile=TILE if name == "tile" else None)
            fastnoise.manual_seed(seed)
            torch.manual_seed(seed)
            fit(model, train, None, method="noise", epochs=a.epochs, batch_size=128, seed=seed,
                messages=lambda m: None, optim={"lr": 0.05}, log={"progress": False})
            if name == "gaussian":  # meets the tile at evaluation, ranges calibrated from data
                for m in (model[1], model[3]):
                    m.set_tile(TILE)
                calibrate(model, DataLoader(train, batch_size=128, shuffle=True), TILE.init_from_data)
            r = evaluate_on_chips(model, test_loader, [SPEC.eta], a.draws, chips=1000 + seed, progress=False)
            acc[name].append(r.accuracies[0])
            print(f"seed {seed} {name:8s} tile-on accuracy {sum(r.accuracies[0]) / a.draws:.2f}% "
                  f"(chips {min(r.accuracies[0]):.2f}..{max(r.accuracies[0]):.2f})", flush=True)
            if a.pcm_times:
                p = fastnoise.evaluate_robustness(model, test_loader, hardware=fastnoise.PCM(),
                                                  times=a.pcm_times, draws=a.draws, seed=1000 + seed,
                                                  progress=False)
                pcm[name].append(p.accuracies)
                per_time = zip(a.pcm_times, p.accuracies, strict=True)
                print(f"seed {seed} {name:8s} PCM + tile: "
                      + ", ".join(f"{t:g} s {sum(v) / len(v):.2f}%" for t, v in per_time), flush=True)
    diffs = [[t - g_ for t, g_ in zip(ts, gs, strict=True)] for ts, gs in zip(acc["tile"], acc["gaussian"],
                                                                             strict=True)]
    _report("tile on", diffs, acc, a)
    for i, t in enumerate(a.pcm_times):
        at = {k: [v[i] for v in pcm[k]] for k in pcm}
        pairs = zip(at["tile"], at["gaussian"], strict=True)
        _report(f"PCM + tile at {t:g} s", [[x - y for x, y in zip(ts, gs, strict=True)] for ts, gs in pairs],
                at, a)
    print(f"{time.time() - t0:.0f} s")


def _report(what: str, diffs, acc: dict, a) -> None:
    d = paired_difference(diffs)
    mean = {k: sum(map(sum, v)) / sum(map(len, v)) for k, v in acc.items()}
    print(f"{what}: gaussian {mean['gaussian']:.2f}%, tile {mean['tile']:.2f}%; tile - gaussian, "
          f"{a.seeds} seeds x {a.draws} chips: {d['mean']:+.2f} points, 95% CI [{d['low']:+.2f}, "
          f"{d['high']:+.2f}]; per-seed means " + ", ".join(f"{m:+.2f}" for m in d["seed_means"]), flush=True)


if __name__ == "__main__":
    main()
