"""Checkpoint files and weight files.

A run folder holds ``config.yaml`` (the resolved settings), ``last.pt`` (everything needed to
resume exactly, see :mod:`fastnoise.train.trainer`), optionally ``best.pt``, and at the end
``model.pth``: the student's plain ``state_dict`` (noise-free weights; the noisy layers keep
torch's keys), loadable by torchvision / ``--weights`` / ``teacher.weights``.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .runfolder import first_nonfinite, load_file, save_torch

__all__ = ["save_atomic", "load_file", "model_state_from", "check_state_dict", "load_weights"]


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, rename, fsync the folder
    (:func:`fastnoise.train.runfolder.save_torch`): a crash never leaves half a file, and a full
    disk is reported as one."""
    save_torch(obj, path)


def model_state_from(obj, path: str, what: str) -> dict:
    """The model ``state_dict`` inside a loaded file: a plain state_dict, or a checkpoint that
    holds one under ``model`` / ``state_dict``; DDP's ``module.`` prefixes are dropped."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{what} file {path!r} does not hold a state_dict")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def check_state_dict(model: nn.Module, state: dict, path: str, what: str, arch: str,
                     classifier: str, data_classes: int) -> None:
    """Raise :class:`ConfigError` naming the first key or shape of ``state`` that ``model`` lacks.

    A mismatch only in the classifier layer is reported as a class-count disagreement.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(f"{what} file {path!r} does not match {arch}: key {missing[0]!r} is missing "
                          f"({len(missing)} missing in all)")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ConfigError(f"{what} file {path!r} does not match {arch}: unexpected key {unexpected[0]!r} "
                          f"({len(unexpected)} unexpected in all)")
    for k, v in own.items():
        if tuple(state[k].shape) == tuple(v.shape):
            continue
        if k.startswith(classifier + ".") and state[k].dim() >= 1:
            raise ConfigError(f"{what} file {path!r} has {state[k].shape[0]} classes ({k} of shape "
                              f"{tuple(state[k].shape)}) but the data has {data_classes}")
        raise ConfigError(f"{what} file {path!r} does not match {arch}: {k} has shape "
                          f"{tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model")


def load_weights(model: nn.Module, path: str, what: str, arch: str, classifier: str,
                 data_classes: int, assign: bool = False) -> None:
    """Load a weight file into ``model`` after :func:`check_state_dict`.

    ``assign=True`` takes the file's tensors as the parameters (for a model built on the meta
    device).
    """
    state = model_state_from(load_file(path, what), path, what)
    check_state_dict(model, state, path, what, arch, classifier, data_classes)
    bad = first_nonfinite(state)
    if bad is not None:
        raise ConfigError(f"{what} file {path!r} holds non-finite values (NaN or inf) in {bad}: it was "
                          "saved from a diverged run or is damaged")
    model.load_state_dict(state, assign=assign)
