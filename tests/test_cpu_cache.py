"""The C++ library's cache (:mod:`fastnoise._cpu`): a cached library is loaded only after its
check (size and SHA-256 against the manifest its build wrote); a damaged or foreign one is
rebuilt, never loaded.

Each case runs in a child process whose ``TORCH_EXTENSIONS_DIR`` holds a copy of this session's
build, damaged, so a SIGBUS (what a truncated library did) fails the test instead of killing
pytest. The copy keeps the object files, so a rebuild is a relink of a few seconds, not the
~30 s compile.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastnoise import _cpu

pytestmark = pytest.mark.skipif(not _cpu.available(), reason=f"no C++ CPU kernels ({_cpu.why_unavailable()})")

# the child: the kernels load and give the contract's normals; prints the library it loaded
CHILD = (
    "import torch\n"
    "from fastnoise import _cpu, rng\n"
    "assert _cpu.available(), _cpu.why_unavailable()\n"
    "z, ref = _cpu.normal_grid(5, 7, 3, 130), rng.normal_grid(5, 7, 3, 130)\n"
    "assert torch.allclose(z, ref, rtol=0, atol=1e-5), (z - ref).abs().max()\n"
    "print(_cpu.library_path())\n"
)


def _foreign_library() -> Path:
    """A valid shared library that is not fastnoise's (one of torch's own, already loaded)."""
    found = sorted((Path(torch.__file__).parent / "lib").glob("libshm*.so"))
    if not found:
        pytest.skip("no libshm.so in torch/lib to stand in for a foreign library")
    return found[0]


DAMAGE = {
    # dlopen maps a cut library and the process died with SIGBUS at the first page past the end
    "truncated": lambda so: so.write_bytes(so.read_bytes()[: so.stat().st_size // 3]),
    "empty": lambda so: so.write_bytes(b""),
    "garbage": lambda so: so.write_bytes(random.Random(0).randbytes(64 * 1024)),
    "foreign": lambda so: shutil.copyfile(_foreign_library(), so),
    # a cache written before the manifest, or the manifest lost: not verifiable, so relinked
    "no-manifest": lambda so: (so.parent / _cpu.MANIFEST).unlink(),
    # no library, its objects kept: the cold build's path (a relink here)
    "missing": lambda so: so.unlink(),
}


def _cache_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of this session's build folder under ``tmp_path/ext``: (the root, the library)."""
    library = Path(_cpu.library_path())
    root = tmp_path / "ext"
    shutil.copytree(library.parent, root / library.parent.name)
    return root, root / library.parent.name / library.name


def _start(root: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "FASTNOISE_NO_EXT"}
    env["TORCH_EXTENSIONS_DIR"] = str(root)
    return subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(child: subprocess.Popen) -> tuple[str, list[str]]:
    """The library the child loaded and its ``fastnoise:`` lines on stderr; fails on a crash."""
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, f"exit {child.returncode} (-7: SIGBUS)\n{err[-3000:]}"
    return out.strip(), [ln for ln in err.splitlines() if ln.startswith("fastnoise:")]


# the quick subset (-m "not slow") keeps the truncated library, the case that crashed
@pytest.mark.parametrize("damage", [d if d == "truncated" else pytest.param(d, marks=pytest.mark.slow)
                                    for d in DAMAGE])
def test_a_damaged_library_is_rebuilt_not_loaded(tmp_path, damage):
    root, library = _cache_copy(tmp_path)
    DAMAGE[damage](library)
    loaded, said = _finish(_start(root))
    assert loaded == str(library) and len(said) == 1, said
    if damage == "missing":
        assert "compiling the C++ CPU kernels once (about 30 s, cached in" in said[0], said
    else:
        assert f"{library.name} failed its check" in said[0] and "rebuilt" in said[0], said
    assert _cpu._check_library(library) == ""  # what the next process checks before it loads


def test_an_intact_library_is_loaded_as_it_is(tmp_path):
    root, library = _cache_copy(tmp_path)
    before = library.stat()
    loaded, said = _finish(_start(root))
    assert loaded == str(library) and not said, said
    after = library.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


MANIFEST_DAMAGE = {
    "not json": (lambda m: "{not json", "unreadable"),
    "not a dict": (lambda m: "[1, 2]", "not this library's"),
    "another library": (lambda m: {**m, "library": "fastnoise_cpu_000000000000.so"}, "not this library's"),
    "another size": (lambda m: {**m, "size": m["size"] + 1}, "bytes where its build wrote"),
    "another checksum": (lambda m: {**m, "sha256": "0" * 64}, "SHA-256 differs"),
}


@pytest.mark.parametrize("case", list(MANIFEST_DAMAGE))
def test_the_check_refuses_a_manifest_that_does_not_match(tmp_path, case):
    _, library = _cache_copy(tmp_path)
    manifest = library.parent / _cpu.MANIFEST
    assert _cpu._check_library(library) == ""
    edit, reason = MANIFEST_DAMAGE[case]
    changed = edit(json.loads(manifest.read_text()))
    manifest.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    assert reason in _cpu._check_library(library)


@pytest.mark.slow
def test_two_processes_on_a_damaged_cache_rebuild_it_once(tmp_path):
    root, library = _cache_copy(tmp_path)
    DAMAGE["truncated"](library)
    children = [_start(root), _start(root)]
    said = [_finish(child)[1] for child in children]
    assert sorted(len(lines) for lines in said) == [0, 1], said  # one rebuilt, the other loaded it
    assert _cpu._check_library(library) == ""


def test_a_failed_relink_clears_the_folder_and_builds_from_scratch(tmp_path, monkeypatch):
    """A damaged object file makes the relink fail: the second try starts from an empty folder."""
    root, library = _cache_copy(tmp_path)
    good = library.read_bytes()
    library.write_bytes(b"")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    seen = []

    def compile_(cpp_extension, name, folder):
        seen.append(sorted(p.name for p in folder.iterdir()))
        if len(seen) == 1:
            raise RuntimeError("ld: noise.o: file truncated")
        library.write_bytes(good)

    monkeypatch.setattr(_cpu, "_compile", compile_)
    monkeypatch.setattr(_cpu, "_state", dict(_cpu._state))
    _cpu._build_and_load()
    assert len(seen) == 2
    assert "noise.o" in seen[0] and library.name not in seen[0]  # the relink: objects kept
    assert not [n for n in seen[1] if n not in ("fastnoise.lock", "lock")]  # then from scratch
    assert _cpu._check_library(library) == ""


def test_a_failed_build_from_scratch_is_not_retried(tmp_path, monkeypatch):
    root, library = _cache_copy(tmp_path)
    for path in library.parent.iterdir():
        if path.name not in ("fastnoise.lock", "lock"):
            path.unlink()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    calls = []

    def compile_(cpp_extension, name, folder):
        calls.append(name)
        raise RuntimeError("noise.cpp: error: expected ';'")

    monkeypatch.setattr(_cpu, "_compile", compile_)
    with pytest.raises(RuntimeError, match="expected ';'"):
        _cpu._build_and_load()
    assert len(calls) == 1
    assert not library.exists() and not (library.parent / _cpu.MANIFEST).exists()
