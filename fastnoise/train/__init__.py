"""The training layer: fit, losses, tasks (classifiers and causal LMs), models, data, recipes,
trainer, checkpoints, DDP.

Imported lazily (``fastnoise.train.kd_loss`` loads :mod:`fastnoise.train.losses` on first use),
so ``import fastnoise`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "kd_loss": "losses",
    "consistency_loss": "losses",
    "ClassificationTask": "tasks",
    "DistillationTask": "tasks",
    "ConsistencyTask": "tasks",
    "FrozenTeacher": "tasks",
    "CausalLMTask": "lm",
    "LMDistillationTask": "lm",
    "LMConsistencyTask": "lm",
    "FrozenLMTeacher": "lm",
    "token_kd_loss": "losses",
    "build_model": "models",
    "fit": "fitting",
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "train": "trainer",
    "ConfigError": "errors",
    "load_recipe": "recipes",
    "list_recipes": "recipes",
    "resolve": "recipes",
    "run_demo": "demo",
    "run_study": "study",
    "fit_study": "study",
    "StudyResult": "study",
    "evaluate_on_chips": "study",
    "paired_difference": "study",
    "build_data": "data",
    "DataBundle": "data",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
