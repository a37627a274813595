"""Path choice for noisy conv2d.

Both Triton paths follow the noise contract, so any forward path pairs with any backward path:

- ``generate``: :func:`fastnoise.kernels.noise_gen.noisy_weight` writes ``W + sigma z`` once in
  the compute dtype (and the weight's memory format), cuDNN convolves, the buffer is dropped
  right after. Costs ``|W|`` normals plus one write and one read of ``|W|``.
- ``fused``: :func:`fastnoise.kernels.noisy_conv.noisy_conv2d_fwd`, an implicit-GEMM conv that
  adds ``sigma z`` to each weight tile after loading it. Costs ``ceil(M / BM) * |W|`` per-element
  normals (``M = N * OH * OW``), nothing of the weight's size written: it wins only when the
  output is small.
- The backward of both regenerates ``W + sigma z`` once for grad input
  (``aten.convolution_backward``); grad weight needs only the weight's shape (straight-through).

``auto`` takes the C++ generator + oneDNN on the CPU (:mod:`fastnoise._backends_cpu`; the
reference for float64 or without the built library) and, on a GPU, ``fused`` when the output has at most
:data:`FUSED_MAX_OUTPUT_PIXELS` pixels and the weight is not too small to matter, else
``generate``. Half and single precision only: float64 runs the reference.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import _backends_cpu, dispatch
from ._backends_base import (  # noqa: F401
    GENERATE_CONV2D,
    REFERENCE_CONV2D,
    conv_out_hw,
    conv_output_memory_format,
    conv_output_shape,
    generated_bias,
    grad_memory_format,
    output_pixels,
)

# Largest output M = N * OH * OW for which `auto` takes the fused kernel. A provisional value
# from the performance model of the design notes (in-kernel noise costs one |W| of normals per
# M-tile, 4x that with per-element Philox, so only a handful of M-tiles can pay off against
# one generation + cuDNN); it stands in for the crossover that `bench/test_bench_conv.py`
# measures per ResNet-50 shape, and is to be replaced by that measurement.
FUSED_MAX_OUTPUT_PIXELS = 256
# Weights below this many elements: the generate path's extra launch is cheap and cuDNN is
# hard to beat, so `auto` keeps generate. Provisional, set by the same benchmark.
FUSED_MIN_WEIGHT_NUMEL = 4096



def _fused_forward(x, weight, bias, sigma, mode, noise_bias, seed, offset, stride, padding,
                   dilation, groups):
    from .kernels import noisy_conv

    y = torch.empty(conv_output_shape(x, weight, (stride, padding, dilation, groups)), dtype=x.dtype,
                    device=x.device, memory_format=conv_output_memory_format(x, weight))
    return noisy_conv.noisy_conv2d_fwd(x, weight, bias, sigma, mode, noise_bias, seed, offset,
                                       stride, padding, dilation, groups, out=y)


FUSED_CONV2D = SimpleNamespace(name="fused", forward=_fused_forward, backward=GENERATE_CONV2D.backward)


# float32: the fused kernel multiplies float32 in IEEE precision on the FMA units, where ptxas
# spills hundreds of registers for sm_90 (tests/test_kernels_compile.py -s), so `auto` keeps
# cuDNN on a generated buffer (which also follows torch.backends.cudnn.allow_tf32).
FUSED_FLOAT32 = False


def auto_path(x, weight, geometry) -> str:
    """``fused`` or ``generate`` for a CUDA conv (see the module docstring)."""
    if x.dtype == torch.float32 and not FUSED_FLOAT32:
        return "generate"
    if (output_pixels(x, weight, geometry) <= FUSED_MAX_OUTPUT_PIXELS
            and weight.numel() >= FUSED_MIN_WEIGHT_NUMEL):
        return "fused"
    return "generate"


def choose(path, x, weight, geometry, backward=False):
    """The implementation of ``path`` for this call (``x`` is the grad in the backward)."""
    if path == "reference":
        return REFERENCE_CONV2D
    if path == "auto" and x.device.type != "cuda":
        return _backends_cpu.CPU_CONV2D if _backends_cpu.usable(x, weight) else REFERENCE_CONV2D
    ok, why = dispatch.triton_usable(x)
    if ok and (x.dtype not in dispatch.KERNEL_DTYPES or weight.dtype not in dispatch.KERNEL_DTYPES):
        ok, why = False, f"Triton conv kernels take float16/bfloat16/float32, got {x.dtype}"
    if not ok:
        if path != "auto":
            dispatch.fall_back("noisy_conv2d", path, why)
        return REFERENCE_CONV2D
    if path == "auto":
        if backward:
            return GENERATE_CONV2D
        path = auto_path(x, weight, geometry)
    return FUSED_CONV2D if path == "fused" else GENERATE_CONV2D
