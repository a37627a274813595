"""Host CPU time of one noisy layer call, for comparing two checkouts side by side.

    python bench/host_ab.py linear-eval|conv-eval|linear-train

The same calls as ``bench/test_bench_host.py`` (the backend's math swapped for the clean op,
tiny tensors, one torch thread), timed in CPU time (``time.process_time``) so that other work on
a shared machine weighs less than in wall time: 300 warm-up calls, then 25 blocks of 200 calls;
prints the best block in us per call. To compare two commits, run it from each checkout's
environment in turn, alternating, several rounds (BENCHMARKS.md, "Host time after the coverage
work"). It touches only what both old and new checkouts have (``_backends.REFERENCE_*``, and
``_backends_cpu`` where it exists).
"""

import sys
import time

import torch
from _baselines import clean_backend_swaps

import fastnoise


def main(case: str) -> float:
    torch.set_num_threads(1)
    for target, name, value in clean_backend_swaps():
        setattr(target, name, value)
    torch.manual_seed(0)
    ctx = []
    if case == "linear-eval":
        layer, x = fastnoise.Linear(16, 16).eval(), torch.randn(2, 16)
        ctx = [torch.no_grad(), fastnoise.noise(eta=0.05, draw=3)]

        def call():
            layer(x)
    elif case == "conv-eval":
        layer, x = fastnoise.Conv2d(4, 4, 3, padding=1).eval(), torch.randn(1, 4, 3, 3)
        ctx = [torch.no_grad(), fastnoise.noise(eta=0.05, draw=3)]

        def call():
            layer(x)
    elif case == "linear-train":
        layer, x = fastnoise.Linear(16, 16).train(), torch.randn(2, 16).requires_grad_()

        def call():
            layer(x).sum().backward()
    else:
        raise SystemExit(f"case must be linear-eval, conv-eval or linear-train, got {case!r}")
    for c in ctx:
        c.__enter__()
    for _ in range(300):
        call()
    best = float("inf")
    for _ in range(25):
        t0 = time.process_time()
        for _ in range(200):
            call()
        best = min(best, (time.process_time() - t0) / 200 * 1e6)
    return best


if __name__ == "__main__":
    print(f"{main(sys.argv[1]):.1f}")
