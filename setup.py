"""Packaging: maps the top-level ``kernels/`` folder to ``fastnoise.kernels`` and builds an
optional CUDA extension from ``csrc/*.cu`` / ``csrc/*.cpp`` (top level; none today) when a
compiler and CUDA are present. The C++ CPU kernels in ``csrc/ops/`` are not built here (pip's
isolated build has no torch, and a library built against another torch breaks at import): their
sources are installed as package data, ``fastnoise/_csrc/`` (``MANIFEST.in`` puts them into the
sdist), and ``fastnoise/_cpu.py`` builds them with ninja on first use (``csrc/README.md``).

The extension is optional: with no compiler, no CUDA or ``FASTNOISE_NO_EXT=1`` the package
installs and works (Triton and PyTorch paths).
"""

import os

from setuptools import find_packages, setup


def _extensions():
    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith((".cu", ".cpp"))] \
        if os.path.isdir("csrc") else []
    if not sources or os.environ.get("FASTNOISE_NO_EXT") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None:
        return [], {}
    ext = CUDAExtension("fastnoise._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastnoise", "fastnoise.*"]) + ["fastnoise.kernels", "fastnoise._csrc"],
    package_dir={"fastnoise.kernels": "kernels", "fastnoise._csrc": "csrc"},
    package_data={"fastnoise._csrc": ["README.md", "ops/*.cpp", "ops/*.h", "ops/cpu/*.cpp", "ops/cpu/*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
