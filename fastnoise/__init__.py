"""fastnoise: fast Gaussian weight-noise training for analog in-memory-compute hardware.

The names below are imported on first use (``fastnoise.convert`` loads :mod:`fastnoise.convert`
and torch then), so ``fastnoise --help`` and ``fastnoise recipes`` answer without importing torch.
"""

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static tools (type checkers, the docs' griffe) see; nothing runs here
    from . import functional
    from .aihwkit import from_aihwkit_lightning
    from .context import noise
    from .convert import (
        CoverageReport,
        CoverageWarning,
        clip_weights,
        convert,
        coverage,
        load_noise_state_dict,
        noise_state_dict,
        noisy_layers,
        restore,
    )
    from .hardware import PCM, HardwareModel
    from .modules import Conv2d, Linear
    from .pregenerate import pregenerated
    from .rng import initial_seed, manual_seed
    from .robustness import RobustnessResult, evaluate_robustness
    from .spec import NoiseSpec
    from .tile import TileSpec

__version__ = "0.1.0"

# public name -> the submodule that defines it (None: the name is the submodule itself)
_EXPORTS = {
    "NoiseSpec": "spec",
    "TileSpec": "tile",
    "PCM": "hardware",
    "HardwareModel": "hardware",
    "clip_weights": "convert",
    "from_aihwkit_lightning": "aihwkit",
    "Linear": "modules",
    "Conv2d": "modules",
    "convert": "convert",
    "restore": "convert",
    "coverage": "convert",
    "CoverageReport": "convert",
    "CoverageWarning": "convert",
    "noise": "context",
    "manual_seed": "rng",
    "initial_seed": "rng",
    "noise_state_dict": "convert",
    "load_noise_state_dict": "convert",
    "noisy_layers": "convert",
    "functional": None,
    "evaluate_robustness": "robustness",
    "RobustnessResult": "robustness",
    "pregenerated": "pregenerate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        # a submodule (fastnoise.rng, fastnoise.modules, ...), as the eager package gave them
        if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _EXPORTS[name]
    value = (importlib.import_module(f".{name}", __name__) if where is None
             else getattr(importlib.import_module(f".{where}", __name__), name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing the submodule ``fastnoise.convert`` binds it as the package's attribute
    ``convert``; the public name is the function, so that binding is left out."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _EXPORTS and _EXPORTS[name] is not None:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
