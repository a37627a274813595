"""The C++ CPU kernels of ``csrc/`` (the ``fastnoise_cpu`` ops): build, load and call.

The library is compiled with ninja by :func:`torch.utils.cpp_extension.load` the first time a
process needs it and cached under torch's extensions folder (``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``) in a folder named after a hash of the sources, the flags,
the torch version and the source folder, so later processes only load it, changed sources
build anew, and two source trees (a checkout and a worktree) keep a build each. With
``FASTNOISE_NO_EXT=1``, no compiler, no ninja, or a failed build, :func:`available` is False,
one ``RuntimeWarning`` says why, and the CPU runs the pure-PyTorch reference.

The kernels are compiled three times from one source: for the baseline of the build (x86-64:
SSE2, any CPU torch runs on), for AVX2 + FMA and for AVX-512 (F/BW/VL/DQ, 512-bit vectors),
picked at run time by the CPU's features (``FASTNOISE_CPU_ISA=baseline``, ``avx2`` or ``avx512``
forces one). All give the same bits.

Backend code only: imports nothing of fastnoise above :mod:`fastnoise.dispatch`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path

import torch

from . import dispatch

__all__ = ["available", "why_unavailable", "library_path", "noisy_weight", "noisy_bias", "normal_grid",
           "philox_words", "kernel_isa", "set_kernel_isa", "SOURCES"]

_CSRC = Path(__file__).resolve().parent.parent / "csrc" / "ops"
SOURCES = ("noise.cpp", "cpu/noise_cpu.cpp", "cpu/noise_kernel_base.cpp", "cpu/noise_kernel_avx2.cpp",
           "cpu/noise_kernel_avx512.cpp")
_HEADERS = ("cpu/kernel_api.h", "cpu/noise_kernel.h")
# -fno-math-errno: sqrt becomes the instruction (vectorisable); -ffp-contract=off: no fused
# multiply-adds, so the baseline and AVX2 copies round alike; -fopenmp: at::parallel_for's
# OpenMP backend (torch's own libgomp at run time)
CFLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state: dict = {"loaded": None, "why": "", "library": ""}


def _build_name() -> str:
    h = hashlib.sha256()
    for rel in SOURCES + _HEADERS:
        h.update(rel.encode())
        h.update((_CSRC / rel).read_bytes())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    # the include path is one of torch's build arguments: two source trees (worktrees, a CI
    # checkout) sharing one cache folder would rebuild it in turn on every load
    h.update(str(_CSRC).encode())
    return f"fastnoise_cpu_{h.hexdigest()[:12]}"


def _ninja_on_path() -> None:
    """The ``ninja`` wheel's binary on PATH, for a venv used without activating it."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _build_and_load() -> None:
    """Compile (or find cached) and load the library; raises with the reason on failure."""
    if not all((_CSRC / rel).is_file() for rel in SOURCES + _HEADERS):
        raise RuntimeError(f"the C++ sources are not in {_CSRC} (an install without csrc/)")
    _ninja_on_path()
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about CUDA_HOME, irrelevant for a CPU build
    try:
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed (pip install ninja)")
        name = _build_name()
        cpp_extension.load(
            name=name,
            sources=[str(_CSRC / rel) for rel in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            extra_include_paths=[str(_CSRC / "cpu")],
            is_python_module=False,
            with_cuda=False,
            verbose=False,
        )
        try:  # where it is, for tests that read the machine code (a private torch helper)
            folder = cpp_extension._get_build_directory(name, False)
            _state["library"] = os.path.join(folder, f"{name}.so")
        except Exception:
            _state["library"] = ""
    finally:
        log.setLevel(level)


def _reason(e: BaseException) -> str:
    """The telling line of a failed build: the compiler's first error, else the last line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    telling = [ln for ln in lines if re.search(r"error:|not found|No such file|fatal", ln)]
    line = (telling or lines or [""])[0 if telling else -1]
    return f"{type(e).__name__}: {line[:300]}"


def available() -> bool:
    """Whether the C++ CPU kernels are loaded (building them on first call); if not, warns once."""
    loaded = _state["loaded"]
    if loaded is not None:
        return loaded
    with _lock:
        if _state["loaded"] is None:
            if os.environ.get("FASTNOISE_NO_EXT") == "1":
                why = "FASTNOISE_NO_EXT=1"
            else:
                try:
                    _build_and_load()
                    why = ""
                except Exception as e:  # no compiler, no ninja, a failed build: all fall back
                    why = f"building the C++ CPU kernels failed ({_reason(e)})"
            _state["why"] = why
            _state["loaded"] = not why
            if why:
                dispatch.warn_once("cpu-ext", f"fastnoise: {why}; CPU layers run the pure-PyTorch "
                                   "reference (slower, same noise)")
    return _state["loaded"]


def why_unavailable() -> str:
    """Empty when the kernels are loaded, else the reason (after :func:`available`)."""
    return _state["why"]


def library_path() -> str:
    """The loaded shared library's path (after :func:`available`), else ``""``."""
    return _state.get("library", "")


def _ops():
    if not available():
        raise RuntimeError(f"fastnoise: the C++ CPU kernels are not available ({why_unavailable()})")
    return torch.ops.fastnoise_cpu


def noisy_weight(weight, sigma, mode: int, seed: int, offset, dtype: torch.dtype) -> torch.Tensor:
    """``W + sigma z`` (stream 0) in ``weight``'s shape and memory format, in ``dtype``."""
    return _ops().noisy_weight(weight.detach(), sigma, int(mode), int(seed), int(offset), dtype)


def noisy_bias(bias, sigma, mode: int, seed: int, offset, dtype: torch.dtype) -> torch.Tensor:
    """``b + sigma z_b`` (stream 1, row 0; each element with its channel's sigma)."""
    return _ops().noisy_bias(bias.detach(), sigma, int(mode), int(seed), int(offset), dtype)


def normal_grid(seed: int, offset: int, rows: int, cols: int, stream: int = 0) -> torch.Tensor:
    """The contract's z, float32 ``[rows, cols]`` (as :func:`fastnoise.rng.normal_grid`)."""
    return _ops().normal_grid(int(seed), int(offset), int(rows), int(cols), int(stream))


def philox_words(seed: int, offset: int, stream: int, rows: int, groups: int) -> torch.Tensor:
    """Philox words of counters ``(g, r, stream, offset)``: int64 ``[rows, groups, 4]``."""
    return _ops().philox_words(int(seed), int(offset), int(stream), int(rows), int(groups))


def kernel_isa() -> str:
    """``"avx512"``, ``"avx2"`` or ``"baseline"``: the kernel copy in use."""
    return _ops().kernel_isa()


def set_kernel_isa(isa: str) -> str:
    """Use the ``"baseline"``, ``"avx2"`` or ``"avx512"`` copy (``"auto"``: by the CPU); returns
    the previous."""
    return _ops().set_kernel_isa(isa)
