"""Path choice for noisy linear, and the two GPU paths.

- ``fused``: :mod:`fastnoise.kernels.noisy_matmul` adds ``sigma z`` to each weight tile inside
  the matmul (forward) and inside ``dY @ Wn`` (input gradient). Draws ``cdiv(M, BM) * |W|``
  normals; nothing of the weight's size is written.
- ``generate``: :func:`fastnoise.kernels.noise_gen.noisy_weight` writes ``W + sigma z`` once in
  the compute dtype, cuBLAS multiplies, the buffer is dropped right after (never saved).

Both compute ``dW = dY^T X`` and ``db = sum dY`` plainly (straight-through), as the reference.
float64 always takes the reference (the kernels handle float16, bfloat16 and float32).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import _backends_cpu, dispatch, reference
from ._backends_base import GENERATE_LINEAR, REFERENCE_LINEAR

# ``auto`` on CUDA: the fused kernel while the rows of the product (M = batch * tokens for the
# forward, the same M for the input gradient) fit in this many, cuBLAS on a generated buffer
# above. Where it comes from: DESIGN.md's table (H100, bf16, N = K = 4096) has generate +
# cuBLAS at 0.079 ms for M = 16, i.e. 0.66x naive, short of the issue's <= 0.5x target for
# M <= 64, which only a kernel without the extra pass over W can reach; and in-matmul noise at
# M = 2048 cost 0.80 ms against 0.155 ms for generate. No measurement between M = 16 and 2048
# yet: 64 is the small-M bound. bench/gpu_linear.py re-measures; update it from there.
FUSED_MAX_M = 64
# float32 with TF32 off (PyTorch's default) makes the fused kernel multiply on the FMA units with
# register spills (ptxas, sm_90); cuBLAS SGEMM on a generated buffer is the safer bet until
# bench/gpu_linear.py's auto_vs_best rows say otherwise. With TF32 on, float32 goes by M.
FUSED_FP32_NEEDS_TF32 = True



def _rows(t: torch.Tensor) -> int:
    """Rows of the product: everything but the last dimension."""
    return t.shape[:-1].numel() if t.dim() else 1


# ----------------------------------------------------------------------------- generate path
# ----------------------------------------------------------------------------- fused path
def _fused_forward(x, weight, bias, sigma, mode, noise_bias, seed, offset):
    from .kernels import noisy_matmul

    return noisy_matmul.noisy_matmul_fwd(x, weight, bias, sigma, mode, noise_bias, seed, offset)


def _fused_backward(grad, x, weight, sigma, mode, seed, offset, need_x, need_w, need_b):
    from .kernels import noisy_matmul

    dx = None
    if need_x:
        dx = noisy_matmul.noisy_matmul_dx(grad, weight, sigma, mode, seed, offset).reshape(x.shape)
    _, dw, db = reference.linear_backward(grad, x, weight, sigma, mode, seed, offset,
                                          False, need_w, need_b)
    return dx, dw, db


FUSED_LINEAR = SimpleNamespace(name="fused", forward=_fused_forward, backward=_fused_backward)
_BY_NAME = {"generate": GENERATE_LINEAR, "fused": FUSED_LINEAR}


def auto_path(x: torch.Tensor) -> str:
    """What ``auto`` runs on a CUDA tensor ``x`` (the forward input, or ``dY`` in the backward)."""
    if (FUSED_FP32_NEEDS_TF32 and x.dtype == torch.float32
            and not torch.backends.cuda.matmul.allow_tf32):
        return "generate"
    return "fused" if _rows(x) <= FUSED_MAX_M else "generate"


def choose(path, x, weight, backward=False):
    """The implementation of ``path`` for input ``x`` (``dY`` when ``backward``).

    ``auto``: on the CPU the C++ generator + BLAS (:mod:`fastnoise._backends_cpu`; the reference
    for float64 or without the built library), on CUDA ``fused`` for at most :data:`FUSED_MAX_M` rows
    else ``generate`` (float32: see :data:`FUSED_FP32_NEEDS_TF32`). An explicit GPU path that
    cannot run (no CUDA and no ``TRITON_INTERPRET=1``, or float64) falls back to the reference
    with one warning.
    """
    if path == "reference":
        return REFERENCE_LINEAR
    if path == "auto" and x.device.type != "cuda":
        return _backends_cpu.CPU_LINEAR if _backends_cpu.usable(x, weight) else REFERENCE_LINEAR
    ok, why = dispatch.triton_usable(x)
    if ok and x.dtype not in dispatch.KERNEL_DTYPES:
        ok, why = False, f"the kernels take float16, bfloat16 or float32, got {x.dtype}"
    if not ok:
        if path != "auto":
            dispatch.fall_back("noisy_linear", path, why)
        return REFERENCE_LINEAR
    return _BY_NAME[auto_path(x) if path == "auto" else path]
