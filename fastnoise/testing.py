"""Comparison helpers shared by the tests and the benchmarks' correctness checks, and an op counter.

Tolerances follow one rule (flash-attn style): compare the kernel and a same-dtype PyTorch
computation against an upcast reference; the kernel may be at most ``factor`` times worse
than PyTorch, plus a small absolute floor tied to the dtype.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ATOL", "assert_close_to_reference", "nan_like", "count_ops"]

# absolute floors, used when the same-dtype PyTorch error happens to be ~0
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close_to_reference(out: torch.Tensor, torch_out: torch.Tensor, upcast_ref: torch.Tensor,
                              factor: float = 2.0, name: str = "output") -> None:
    """``max|out - ref| <= factor * max|torch_out - ref| + atol * scale``.

    ``out``: the implementation under test; ``torch_out``: PyTorch in the same dtype;
    ``upcast_ref``: the same math in float64 (or float32 for half types).
    """
    assert out.shape == upcast_ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(upcast_ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten elements?)"
    ref = upcast_ref.double()
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    base = (torch_out.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = factor * base + ATOL[out.dtype] * scale
    assert err <= bound, (f"{name}: max error {err:.3g} > {bound:.3g} "
                          f"(same-dtype PyTorch error {base:.3g}, dtype {out.dtype})")


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer pre-filled with NaN, so an unwritten element fails a comparison."""
    return torch.full_like(t, float("nan"))


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, *args, **kwargs) -> collections.Counter:
    """``{op: calls}`` of the ops ``fn(*args, **kwargs)`` dispatches, e.g. ``{"aten.aminmax": 1}``.

    Counted below autograd, at the top level only: a custom op (``fastnoise.noisy_linear``) is one
    op, the ops inside it are not counted. Each op is at least one launch on a GPU (views and
    ``detach`` none), so the counts measure a forward's per-call overhead on any device.
    """
    with _OpCounter() as counter:
        fn(*args, **kwargs)
    return counter.counts
