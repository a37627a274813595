"""fastnoise: fast Gaussian weight-noise training for analog in-memory-compute hardware."""

from . import functional
from .context import noise
from .convert import (
                      CoverageReport,
                      CoverageWarning,
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

__version__ = "0.1.0"

__all__ = [
    "NoiseSpec",
    "Linear",
    "Conv2d",
    "convert",
    "restore",
    "coverage",
    "CoverageReport",
    "CoverageWarning",
    "noise",
    "manual_seed",
    "initial_seed",
    "noise_state_dict",
    "load_noise_state_dict",
    "noisy_layers",
    "functional",
    "evaluate_robustness",
    "RobustnessResult",
    "pregenerated",
    "PCM",
    "HardwareModel",
]
