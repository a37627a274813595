"""The crossbar tile's cost against the plain noisy layer, providers interleaved in one process.

    PYTHONPATH=. python bench/tile_cost.py [rounds]

The Linear case of ``bench/test_bench_tile.py`` (1024 -> 1024, M = 256, forward + backward, the
same chip and providers), one torch thread, each round one call of every provider in turn, so a
shared machine's load falls on all of them alike (pytest-benchmark times one provider after the
other). Prints per provider the median and the min of the wall time and of the thread's CPU time
(``time.thread_time``: time other processes take from this core does not count), and the ratios
tile / noisy and tile / aihwkit of both (aihwkit-lightning where it is installed).
"""

import statistics
import sys
import time

import torch
from test_bench_tile import _as
from torch import nn

PROVIDERS = ["clean", "noisy", "tile", "aihwkit"]


def main(rounds: int = 40) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(1024, 1024))
    x = torch.randn(256, 1024, requires_grad=True)
    layers = {}
    for p in PROVIDERS:
        try:
            layers[p] = _as(p, base).train()
        except BaseException as e:  # noqa: BLE001 - pytest's skip (aihwkit-lightning not installed)
            print(f"{p}: skipped ({type(e).__name__}: {e})")
    wall = {p: [] for p in layers}
    cpu = {p: [] for p in layers}
    for _ in range(3):  # warm-up
        for layer in layers.values():
            layer(x).sum().backward()
    for _ in range(rounds):
        for p, layer in layers.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            layer(x).sum().backward()
            wall[p].append(time.perf_counter() - t0)
            cpu[p].append(time.thread_time() - c0)
    out = {}
    for name, times in (("wall", wall), ("cpu", cpu)):
        med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
        low = {p: min(v) * 1e3 for p, v in times.items()}
        print(f"{name} time (ms), {rounds} rounds: "
              + "; ".join(f"{p} median {med[p]:.1f} min {low[p]:.1f}" for p in times))
        for base_ in ("noisy", "aihwkit"):
            if base_ in times:
                print(f"  tile / {base_}: median {med['tile'] / med[base_]:.2f}x, "
                      f"min {low['tile'] / low[base_]:.2f}x")
        out[name] = (med, low)
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
