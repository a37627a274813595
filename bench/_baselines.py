"""What the CPU and host benchmarks compare fastnoise with, and how they set ratios side by side.

- ``naive_classes(noise_std)``: the layers people write today, ``W + noise_std(W) * randn_like(W)``
  drawn afresh in every call (train and eval), then the clean op;
- ``clean_backend_swaps()``: the (object, attribute, value) triples that replace the math of the
  CPU backends (the reference, and the C++ path where the checkout has one) with the clean
  ``F.linear`` / ``F.conv2d`` and their gradients, so that only the host's work is timed;
- ``Medians``: the medians of one session, and each provider's ratio to the baselines in it.
"""

import torch
import torch.nn.functional as F
from torch import nn


def naive_classes(noise_std):
    """``(NaiveLinear, NaiveConv2d)``, whose noise has standard deviation ``noise_std(weight)``."""

    class NaiveLinear(nn.Linear):
        def forward(self, x):
            w = self.weight
            return F.linear(x, w + noise_std(w) * torch.randn_like(w), self.bias)

    class NaiveConv2d(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            return self._conv_forward(x, w + noise_std(w) * torch.randn_like(w), self.bias)

    return NaiveLinear, NaiveConv2d


def _linear(x, w, b, *args):
    return F.linear(x, w, b)


def _linear_backward(grad, x, w, sigma, mode, seed, offset, need_x, need_w, need_b):
    return (grad @ w if need_x else None, grad.t() @ x if need_w else None,
            grad.sum(0) if need_b else None)


def _conv_forward(x, w, b, sigma, mode, noise_bias, seed, offset, stride, padding, dilation, groups):
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


def clean_backend_swaps() -> list:
    """Triples for ``setattr`` (or ``monkeypatch.setattr``). Touches only what old and new
    checkouts both have: ``_backends.REFERENCE_*``, and ``_backends_cpu`` where it exists."""
    from fastnoise import _backends

    linears, convs = [_backends.REFERENCE_LINEAR], [_backends.REFERENCE_CONV2D]
    try:
        from fastnoise import _backends_cpu
    except ImportError:  # a checkout before the C++ CPU path
        pass
    else:
        linears.append(_backends_cpu.CPU_LINEAR)
        convs.append(_backends_cpu.CPU_CONV2D)
    return ([(t, "forward", _linear) for t in linears] + [(t, "backward", _linear_backward) for t in linears]
            + [(t, "forward", _conv_forward) for t in convs])


class Medians:
    """``record`` keeps a benchmark's median under (key, provider) and writes its ratio to each
    baseline already timed for that key into ``extra_info["ratio_vs_<baseline>"]`` ('-' as '_')."""

    def __init__(self):
        self.by_key: dict = {}

    def record(self, benchmark, key: tuple, provider: str, bases=("clean", "naive")) -> None:
        median = self.by_key[key + (provider,)] = benchmark.stats.stats.median
        for base in bases:
            other = self.by_key.get(key + (base,))
            if other and base != provider:
                benchmark.extra_info[f"ratio_vs_{base.replace('-', '_')}"] = round(median / other, 3)
