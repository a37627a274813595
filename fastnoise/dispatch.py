"""Which implementation runs a noisy op.

Paths (all follow the same noise contract, so forward and backward may take different ones):

- ``reference``: pure PyTorch (:mod:`fastnoise.reference`), any device.
- ``generate``: a Triton kernel writes ``W + sigma z`` once into a short-lived buffer in the
  compute dtype, then cuBLAS / cuDNN runs; the buffer is freed right after.
- ``fused``: a Triton matmul / implicit-GEMM conv adds ``sigma z`` to each weight tile after
  loading it; nothing of the weight's size is written.

``auto`` picks ``fused`` or ``generate`` from the shape on a GPU; on the CPU it runs the C++
generator of ``csrc/`` and torch's BLAS / oneDNN op (:mod:`fastnoise._backends_cpu`), or the
reference when that library is not built (or for float64). Triton kernels also run on CPU
tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

PATHS = ("auto", "reference", "fused", "generate")
# what the Triton kernels compute in (float64 always takes the reference)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_warned: set[str] = set()


_MODE_KEY = torch._C._TorchDispatchModeKey


def tracing() -> bool:
    """Compiling, tracing (``torch.jit.trace``, ``make_fx``) or under ``FakeTensorMode``: the
    values seen are not the ones a later call will see, so nothing may be kept, skipped or read
    back to the host."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._get_dispatch_mode(_MODE_KEY.FAKE) is not None
            or torch._C._get_dispatch_mode(_MODE_KEY.PROXY) is not None)


def check_path(path: str) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(t: torch.Tensor) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``t``'s device, and if not, why."""
    if not _triton_available():
        return False, "triton is not installed"
    if t.device.type == "cuda":
        return True, ""
    if t.device.type == "cpu" and triton_interpret():
        return True, ""
    return False, f"Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {t.device}"


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def fall_back(op: str, path: str, reason: str) -> str:
    warn_once(f"{op}:{path}:{reason}", f"fastnoise.{op}: path={path!r} unavailable ({reason}); "
              "using the pure-PyTorch reference")
    return "reference"
