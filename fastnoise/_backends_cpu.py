"""The CPU ``auto`` path: C++ writes ``W + sigma z``, then torch's BLAS / oneDNN op runs.

:func:`fastnoise._cpu.noisy_weight` (``csrc/``) writes the noisy weight once, in the compute
dtype and the weight's memory format, with no temporaries of the weight's size; ``F.linear`` /
``F.conv2d`` consume it and it is dropped right after (never saved). The backward regenerates it
for the input gradient; ``dW`` and ``db`` are straight-through, computed as the reference does.
This is the ``generate`` path of the GPU with the C++ generator in place of the Triton kernel.

Taken by ``path="auto"`` on CPU tensors of float32 / bfloat16 / float16 (weights of those
dtypes too) when the library is built (:func:`fastnoise._cpu.available`); float64, or no
library, runs the reference. ``path="reference"`` always runs the reference.
"""

from __future__ import annotations

import torch

from . import _cpu, dispatch
from ._backends_base import generate_paths


def _generator():
    return _cpu


# the generate paths with the C++ ops as the generator (BLAS / oneDNN for the clean op)
CPU_LINEAR, CPU_CONV2D, _ = generate_paths(_generator, "cpu")


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C++ path can take this CPU call (dtypes, and the library built)."""
    return (x.device.type == "cpu" and x.dtype in dispatch.KERNEL_DTYPES
            and weight.dtype in dispatch.KERNEL_DTYPES and _cpu.available())
