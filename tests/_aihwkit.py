"""IBM aihwkit's pure-Python inference noise models, for tests that compare fastnoise's chips with
them, without building aihwkit's C++ simulator.

:func:`aihwkit_modules` returns aihwkit 1.2.0's ``inference.noise.pcm`` and
``inference.compensation.drift`` modules, or raises ``pytest.skip`` with the reason. Where an
``aihwkit`` is installed it is used; otherwise the 1.2.0 sdist is looked for in

1. ``FASTNOISE_AIHWKIT_SDIST``: the ``.tar.gz``, or the unpacked sdist folder;
2. the cache folder (``FASTNOISE_CACHE``, default ``~/.cache/fastnoise``), ``aihwkit-1.2.0/``;
3. else it is downloaded there with ``pip download`` (set ``FASTNOISE_AIHWKIT_DOWNLOAD=0`` to never
   try); pip prepares an sdist's metadata, which runs aihwkit's ``setup.py``: a stand-in
   ``skbuild`` module (``setup = setuptools.setup``) lets that step run without scikit-build.

Then a stub package ``aihwkit`` (and ``aihwkit.inference``, whose ``__init__`` imports the
simulator) is put in ``sys.modules`` with ``__path__`` the sdist's ``src/aihwkit``, so the pure-Python
submodules import as they are. ``python tests/_aihwkit.py`` fetches the sdist into the cache (CI).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types

VERSION = "1.2.0"
_state: dict = {}


def cache_dir() -> str:
    return os.environ.get("FASTNOISE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastnoise")


def _src_of(folder: str):
    for cand in (os.path.join(folder, "src", "aihwkit"), os.path.join(folder, f"aihwkit-{VERSION}", "src",
                                                                      "aihwkit")):
        if os.path.isfile(os.path.join(cand, "inference", "noise", "pcm.py")):
            return cand
    return None


def _unpack(tar: str, into: str) -> str | None:
    os.makedirs(into, exist_ok=True)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return _src_of(into)


def download(timeout: float = 180.0) -> tuple[str | None, str]:
    """Fetch the sdist into the cache folder: (its src/aihwkit or None, why not)."""
    dest = cache_dir()
    found = _src_of(dest)
    if found:
        return found, ""
    with tempfile.TemporaryDirectory() as tmp:
        stub = os.path.join(tmp, "stub")
        os.makedirs(stub)
        with open(os.path.join(stub, "skbuild.py"), "w") as f:
            f.write("from setuptools import setup  # noqa: F401  (metadata only)\n")
        env = dict(os.environ, PYTHONPATH=stub + os.pathsep + os.environ.get("PYTHONPATH", ""))
        base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "aihwkit",
                "--timeout", "15", "--retries", "1", "-q", "-d", tmp, f"aihwkit=={VERSION}"]
        # first without build isolation (the stand-in skbuild; needs setuptools >= 77), then with
        # it (pip fetches aihwkit's build requirements as wheels: slower, but any setuptools)
        why = ""
        for cmd in (base + ["--no-build-isolation"], base):
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as e:
                why = f"pip download aihwkit=={VERSION} failed: {e}"
                continue
            tars = [f for f in os.listdir(tmp) if f.endswith(".tar.gz")]
            if r.returncode == 0 and tars:
                return _unpack(os.path.join(tmp, tars[0]), dest), ""
            why = f"pip download aihwkit=={VERSION} failed: {(r.stderr or r.stdout).strip()[-300:]}"
        return None, why


def find_src() -> tuple[str | None, str]:
    given = os.environ.get("FASTNOISE_AIHWKIT_SDIST")
    if given:
        if os.path.isdir(given):
            found = _src_of(given)
        elif given.endswith(".tar.gz") and os.path.isfile(given):
            found = _unpack(given, os.path.join(cache_dir(), "given"))
        else:
            found = None
        return (found, "") if found else (None, f"FASTNOISE_AIHWKIT_SDIST={given!r} holds no aihwkit sdist")
    found = _src_of(cache_dir())
    if found:
        return found, ""
    if os.environ.get("FASTNOISE_AIHWKIT_DOWNLOAD", "1") == "0":
        return None, f"no aihwkit {VERSION} sdist in {cache_dir()} (FASTNOISE_AIHWKIT_DOWNLOAD=0)"
    return download()


def aihwkit_modules():
    """(``aihwkit.inference.noise.pcm``, ``aihwkit.inference.compensation.drift``), or skip."""
    import pytest

    if "mods" in _state:
        return _state["mods"]
    if "why" in _state:
        pytest.skip(_state["why"])
    try:  # a real install
        mods = (importlib.import_module("aihwkit.inference.noise.pcm"),
                importlib.import_module("aihwkit.inference.compensation.drift"))
        _state["mods"] = mods
        return mods
    except Exception:  # noqa: BLE001 (absent, or present without its simulator)
        for name in [m for m in sys.modules if m == "aihwkit" or m.startswith("aihwkit.")]:
            del sys.modules[name]
    src, why = find_src()
    if src is None:
        _state["why"] = why
        pytest.skip(why)
    for name, sub in (("aihwkit", ""), ("aihwkit.inference", "inference")):
        mod = types.ModuleType(name)
        mod.__path__ = [os.path.join(src, sub) if sub else src]
        sys.modules[name] = mod
    try:
        mods = (importlib.import_module("aihwkit.inference.noise.pcm"),
                importlib.import_module("aihwkit.inference.compensation.drift"))
    except Exception as e:  # noqa: BLE001
        _state["why"] = f"aihwkit {VERSION}'s inference modules did not import from {src}: {e!r}"
        pytest.skip(_state["why"])
    _state["mods"] = mods
    return mods


if __name__ == "__main__":
    src, why = find_src()
    print(src if src else f"aihwkit {VERSION} sdist not available: {why}")
    sys.exit(0 if src else 1)
