"""The C++ CPU kernels of ``csrc/`` (the ``fastnoise_cpu`` ops): build, load and call.

The sources ship with the package (``fastnoise/_csrc/`` in a wheel or ``pip install .``; the
checkout's ``csrc/`` in an editable install). The library is compiled with ninja by
:func:`torch.utils.cpp_extension.load` the first time a process needs it (one line on stderr says
so: about 30 s) and cached under torch's extensions folder (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) in a folder named after a hash of the sources, the flags, the torch
version and the source folder, so later processes only load it, changed sources build anew, and
two source trees (a checkout and a worktree, a checkout and a wheel) keep a build each.

A cached library is never loaded blind: a build writes its size and SHA-256 into
``fastnoise-build.json`` next to it, and a later process loads it only when both match. A
truncated, empty, garbage or foreign library (or a lost manifest) is deleted and relinked, and if
that fails the folder is cleared and built from scratch; all of it under an ``flock`` on the
folder's ``fastnoise.lock``, so two processes never build or check at once. With
``FASTNOISE_NO_EXT=1``, no compiler, no ninja, or a failed build, :func:`available` is False, one
``RuntimeWarning`` says why, and the CPU runs the pure-PyTorch reference.

The kernels are compiled three times from one source: for the baseline of the build (x86-64:
SSE2, any CPU torch runs on), for AVX2 + FMA and for AVX-512 (F/BW/VL/DQ, 512-bit vectors),
picked at run time by the CPU's features (``FASTNOISE_CPU_ISA=baseline``, ``avx2`` or ``avx512``
forces one). All give the same bits.

Backend code only: imports nothing of fastnoise above :mod:`fastnoise.dispatch`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
from pathlib import Path

import torch

from . import dispatch

try:
    import fcntl
except ImportError:  # not POSIX: no lock between processes
    fcntl = None

__all__ = ["available", "why_unavailable", "library_path", "sources_dir", "noisy_weight", "noisy_bias",
           "normal_grid", "philox_words", "pcm_weight", "kernel_isa", "set_kernel_isa", "SOURCES"]

SOURCES = ("noise.cpp", "cpu/noise_cpu.cpp", "cpu/pcm_cpu.cpp", "cpu/noise_kernel_base.cpp",
           "cpu/noise_kernel_avx2.cpp", "cpu/noise_kernel_avx512.cpp", "cpu/tile_cpu.cpp")
_HEADERS = ("cpu/kernel_api.h", "cpu/noise_kernel.h", "cpu/ops_common.h")
# -fno-math-errno: sqrt becomes the instruction (vectorisable); -ffp-contract=off: no fused
# multiply-adds, so the baseline and AVX2 copies round alike; -fopenmp: at::parallel_for's
# OpenMP backend (torch's own libgomp at run time)
CFLAGS = ("-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)
MANIFEST = "fastnoise-build.json"  # the size and SHA-256 of the library a build wrote
_LOCK_FILES = ("fastnoise.lock", "lock")  # ours, and torch's (cpp_extension's FileLock)


def _find_sources() -> Path:
    """``fastnoise/_csrc/ops`` of an installed package, else the checkout's ``csrc/ops``."""
    package = Path(__file__).resolve().parent
    for folder in (package / "_csrc" / "ops", package.parent / "csrc" / "ops"):
        if (folder / SOURCES[0]).is_file():
            return folder
    return package / "_csrc" / "ops"


_CSRC = _find_sources()

_lock = threading.Lock()
_state: dict = {"loaded": None, "why": "", "library": ""}


def sources_dir() -> Path:
    """The folder of the C++ sources this process builds from."""
    return _CSRC


def _build_name() -> str:
    h = hashlib.sha256()
    # every source and header of the folder (not only those named above: the cached library is
    # loaded without asking ninja, so an edited file must change the name)
    for path in sorted(p for p in _CSRC.rglob("*") if p.suffix in (".cpp", ".h") and p.is_file()):
        h.update(path.relative_to(_CSRC).as_posix().encode())
        h.update(path.read_bytes())
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


def _build_folder(cpp_extension, name: str) -> Path:
    try:  # torch's own choice (TORCH_EXTENSIONS_DIR, else its default root); a private helper
        folder = Path(cpp_extension._get_build_directory(name, False))
    except Exception:
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An ``flock`` on ``folder/fastnoise.lock``: one process checks, builds or loads at a time."""
    if fcntl is None:
        yield
        return
    with open(folder / _LOCK_FILES[0], "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _digest(path: Path) -> dict:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _check_library(library: Path) -> str:
    """Empty when ``library`` is the one its build wrote (size and SHA-256 as in the manifest),
    else why not; ``"missing"`` when there is none."""
    if not library.is_file():
        return "missing"
    try:
        manifest = json.loads((library.parent / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    if not isinstance(manifest, dict) or manifest.get("library") != library.name:
        return f"{MANIFEST} is not this library's"
    try:
        found = _digest(library)
    except OSError as e:
        return f"unreadable ({type(e).__name__})"
    if found["size"] != manifest.get("size"):
        return f"{found['size']} bytes where its build wrote {manifest.get('size')}"
    if found["sha256"] != manifest.get("sha256"):
        return "its SHA-256 differs from its build's"
    return ""


def _write_manifest(library: Path) -> None:
    manifest = library.parent / MANIFEST
    temp = manifest.with_name(f"{MANIFEST}.{os.getpid()}.tmp")
    temp.write_text(json.dumps({"library": library.name, **_digest(library), "torch": torch.__version__}))
    os.replace(temp, manifest)


def _clear(folder: Path, everything: bool) -> None:
    """Delete the library and its manifest; with ``everything``, every build file (objects,
    ninja's files), so the next build starts from scratch. The lock files stay."""
    for path in folder.iterdir():
        if path.name in _LOCK_FILES:
            continue
        if everything or path.suffix == ".so" or path.name.startswith(MANIFEST):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _compile(cpp_extension, name: str, folder: Path) -> None:
    """ninja through torch: builds what is missing or stale, then loads the library."""
    versions = getattr(getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None), "entries", {})
    versions.pop(name, None)  # torch skips ninja for a name it has seen in this process
    cpp_extension.load(
        name=name,
        sources=[str(_CSRC / rel) for rel in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        extra_include_paths=[str(_CSRC / "cpu")],
        build_directory=str(folder),
        is_python_module=False,
        with_cuda=False,
        verbose=False,
    )


def _build_and_load() -> None:
    """Load the cached library if it passes its check, else (re)build and load it; raises with
    the reason on failure."""
    if not all((_CSRC / rel).is_file() for rel in SOURCES + _HEADERS):
        raise RuntimeError(f"the C++ sources are not in {_CSRC} (an install without them)")
    _ninja_on_path()
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about CUDA_HOME, irrelevant for a CPU build
    try:
        from torch.utils import cpp_extension

        name = _build_name()
        folder = _build_folder(cpp_extension, name)
        library = folder / f"{name}.so"
        with _folder_lock(folder):
            problem = _check_library(library)
            if not problem:
                torch.ops.load_library(str(library))
            else:
                if not cpp_extension.is_ninja_available():
                    raise RuntimeError("ninja is not installed (pip install ninja)")
                if problem == "missing":
                    said = f"compiling the C++ CPU kernels once (about 30 s, cached in {folder})"
                else:
                    said = f"the cached C++ library {library} failed its check ({problem}); it is rebuilt " \
                        "(up to about 30 s)"
                sys.stderr.write(f"fastnoise: {said}\n")
                sys.stderr.flush()
                _clear(folder, everything=False)
                had_objects = any(folder.glob("*.o"))
                try:
                    _compile(cpp_extension, name, folder)
                except Exception:
                    if not had_objects:
                        raise
                    _clear(folder, everything=True)  # a damaged object file: build from scratch
                    _compile(cpp_extension, name, folder)
                _write_manifest(library)
        _state["library"] = str(library)
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


def pcm_weight(weight: torch.Tensor, key: int, read_key: int, chip: int, read: int, t: float,
               device: tuple, prog_coeff: tuple) -> torch.Tensor:
    """A PCM chip's effective weight, float32 ``[out, K]`` of a float32 ``[out, K]`` weight (see
    :mod:`fastnoise._hardware_ops` for ``device``)."""
    return _ops().pcm_weight(weight.detach(), int(key), int(read_key), int(chip), int(read) & 0xFFFFFFFF,
                             float(t), [float(v) for v in device], [float(c) for c in prog_coeff])


def kernel_isa() -> str:
    """``"avx512"``, ``"avx2"`` or ``"baseline"``: the kernel copy in use."""
    return _ops().kernel_isa()


def set_kernel_isa(isa: str) -> str:
    """Use the ``"baseline"``, ``"avx2"`` or ``"avx512"`` copy (``"auto"``: by the CPU); returns
    the previous."""
    return _ops().set_kernel_isa(isa)
