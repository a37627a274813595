"""Comparison helpers shared by the tests and the benchmarks' correctness checks, and an op counter.

Tolerances follow one rule (flash-attn style): compare the kernel and a same-dtype PyTorch
computation against an upcast reference; the kernel may be at most ``factor`` times worse
than PyTorch, plus a small absolute floor tied to the dtype.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ATOL", "assert_close_to_reference", "nan_like", "count_ops", "weight_consumers",
           "matmul_operands", "MATMUL_ATEN"]

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


# ----------------------------------------------------------------------------- which op gets a weight
# aten ops that multiply or convolve their tensor arguments, and the argument positions that are
# operands (not the added bias); what a dispatch mode sees below autograd once composites such as
# linear, matmul, einsum and lstm have decomposed
MATMUL_ATEN = {
    "aten.mm": (0, 1), "aten.addmm": (1, 2), "aten.bmm": (0, 1), "aten.baddbmm": (1, 2),
    "aten.addbmm": (1, 2), "aten.mv": (0, 1), "aten.addmv": (1, 2), "aten.dot": (0, 1),
    "aten.vdot": (0, 1), "aten._addmm_activation": (1, 2), "aten.convolution": (0, 1),
    "aten._convolution": (0, 1), "aten.mkldnn_convolution": (0, 1), "aten._mkldnn_convolution": (0, 1),
    "aten.conv_tbc": (0, 1), "aten._native_multi_head_attention": (0, 1, 2, 4, 6),
    "aten.mkldnn_rnn_layer": (0, 1, 2), "aten._cudnn_rnn": (0, 1, 3), "aten.miopen_rnn": (0, 1),
    "aten._transformer_encoder_layer_fwd": tuple(range(1, 16)),
}


class _Consumers(TorchDispatchMode):
    def __init__(self, storages: dict):
        super().__init__()
        self.storages = storages  # storage address -> [parameter names]
        self.uses: dict = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = str(func.overloadpacket)
        positions = MATMUL_ATEN.get(op)
        flat = list(args) + list((kwargs or {}).values())
        for i, a in enumerate(flat):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                    continue
                try:
                    names = self.storages.get(t.untyped_storage().data_ptr())
                except RuntimeError:  # a tensor without storage
                    continue
                if names is None:
                    continue
                kind = op if positions is None or i in positions else f"{op}[bias]"
                for n in names:
                    self.uses[n][kind] += 1
        return func(*args, **(kwargs or {}))


def weight_consumers(model: torch.nn.Module, fn, *args, **kwargs) -> dict:
    """``{parameter name: Counter of the ops that read it}`` while ``fn(*args, **kwargs)`` runs.

    Seen below autograd by storage, so a view of a weight (``W.t()``, a chunk of a packed
    projection) counts as the weight; a noisy copy does not. Matmul and convolution ops carry
    their aten name (``aten.addmm``); a matmul's bias argument is reported as ``aten.addmm[bias]``.
    The noisy ops of fastnoise appear as ``fastnoise.noisy_linear`` etc. Tied parameters are all
    named (``remove_duplicate=False``).
    """
    storages: dict = collections.defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        storages[p.untyped_storage().data_ptr()].append(name)
    with _Consumers(dict(storages)) as mode:
        fn(*args, **kwargs)
    return {n: c for n, c in mode.uses.items()}


def matmul_operands(uses: dict) -> set:
    """The parameter names of :func:`weight_consumers` that reached a clean matmul or convolution."""
    return {n for n, c in uses.items() if any(op in MATMUL_ATEN for op in c)}
