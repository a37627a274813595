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
import torch.nn.functional as F

import fastnoise
from fastnoise import _backends


def _linear_backward(grad, x, w, sigma, mode, seed, offset, need_x, need_w, need_b):
    return (grad @ w if need_x else None, grad.t() @ x if need_w else None,
            grad.sum(0) if need_b else None)


def _conv_forward(x, w, b, sigma, mode, noise_bias, seed, offset, stride, padding, dilation, groups):
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def _swap_backends() -> None:
    linears, convs = [_backends.REFERENCE_LINEAR], [_backends.REFERENCE_CONV2D]
    try:
        from fastnoise import _backends_cpu

        linears.append(_backends_cpu.CPU_LINEAR)
        convs.append(_backends_cpu.CPU_CONV2D)
    except ImportError:  # a checkout before the C++ CPU path
        pass
    for t in linears:
        t.forward = lambda x, w, b, *a: F.linear(x, w, b)
        t.backward = _linear_backward
    for t in convs:
        t.forward = _conv_forward


def main(case: str) -> float:
    torch.set_num_threads(1)
    _swap_backends()
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
