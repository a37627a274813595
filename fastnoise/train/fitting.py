"""``fastnoise.train.fit``: train the user's own model on the user's own data, on the CLI's engine.

::

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from fastnoise import NoiseSpec
    from fastnoise.train import fit

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train = TensorDataset(torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,)))
    val = TensorDataset(torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,)))
    result = fit(model, train, val, method="noise", spec=NoiseSpec(eta=0.06), epochs=3,
                 batch_size=64, optim={"lr": 0.05}, verbose=False)
    print(result.robustness.table())  # result.model, result.history too

It is :class:`~fastnoise.train.trainer.Trainer` with the model and data given instead of named
in a recipe: the same loop, AMP, channels_last, DDP under ``torchrun``, exact resume, metrics,
progress bars and the robustness table at the end.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from ..convert import noisy_layers
from ..spec import NoiseSpec
from .errors import ConfigError
from .recipes import DEFAULTS, METHODS, _merge
from .runfolder import flatten
from .trainer import Given, Trainer, TrainResult

__all__ = ["fit", "FIT_ARGUMENTS", "NOT_FOR_FIT"]

# settings that fit takes as its own arguments
FIT_ARGUMENTS = {"schedule.epochs": "epochs=", "data.batch_size": "batch_size=",
                 "model.channels_last": "channels_last=", "task": "task="}
# settings that name what fit is given (the model, the data, the teacher) or how a recipe builds it
NOT_FOR_FIT = ("model.arch", "model.init", "data.dataset", "data.root", "data.num_classes",
               "data.image_size", "data.val_resize", "data.augment", "data.skip_unreadable",
               "teacher.arch", "teacher.weights", "teacher.epochs", "teacher.lr")


def _quiet(message: str) -> None:
    """``verbose=False``: no messages."""


def fit_config(method, spec: Optional[NoiseSpec], epochs: int, batch_size: Optional[int],
               channels_last, settings: dict) -> dict:
    """The run's settings: :data:`~fastnoise.train.recipes.DEFAULTS`, then ``settings``
    (nested by section, as in a recipe: ``optim={"lr": 0.01}``), then fit's own arguments."""
    cfg = copy.deepcopy(DEFAULTS)
    cfg["name"] = "fit"
    if isinstance(method, dict):  # the recipe's method section: {"name": ..., "layers": ...}
        section = dict(method)
        method = section.pop("name", "noise")
        _merge(cfg, {"method": copy.deepcopy(section)})
    elif not isinstance(method, str):
        raise ConfigError(f"method must be a method's name or a dict of the method section, got {method!r}")
    _merge(cfg, copy.deepcopy(settings))  # an unknown key is a ConfigError naming it
    given = flatten(settings)
    for key in given:
        if key in FIT_ARGUMENTS:
            raise ConfigError(f"{key} is fit's argument {FIT_ARGUMENTS[key]}: pass it there")
        if key in NOT_FOR_FIT:
            raise ConfigError(f"{key} is not a setting of fit: the model, the data and the teacher are "
                              "its arguments")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
    cfg["method"]["name"] = method
    cfg["schedule"]["epochs"] = epochs
    cfg["model"]["channels_last"] = channels_last
    if batch_size is not None:
        cfg["data"]["batch_size"] = batch_size
    if spec is not None:
        if not isinstance(spec, NoiseSpec):
            raise ConfigError(f"spec must be a fastnoise.NoiseSpec, got {type(spec).__name__}")
        clash = [k for k in ("noise.eta", "noise.scale", "noise.noise_bias") if k in given]
        if clash:
            raise ConfigError(f"{clash[0]} is set twice: by spec= and by the settings; give one")
        cfg["noise"].update(eta=spec.eta, scale=spec.scale, noise_bias=spec.noise_bias)
    for key in ("model.arch", "data.dataset", "model.init", "teacher.weights"):
        section, leaf = key.split(".")
        cfg[section][leaf] = None
    cfg["teacher"]["epochs"] = 0
    return cfg


def resolve_task(task, train_data, val_data) -> str:
    """The run's task: ``task`` if named (checked against the data), else read from the data
    (token ids: ``"causal_lm"``, anything else ``"classification"``)."""
    from .. import lm
    from .lm import infer_task

    if task is not None and task not in lm.TASKS:
        raise ConfigError(f"task must be one of {list(lm.TASKS)} or None (read from the data), got {task!r}")
    found = infer_task(train_data)
    if found is None and val_data is not None:
        found = infer_task(val_data)
    if task == "causal_lm" and found == "classification":
        raise ConfigError("task='causal_lm' but train_data[0] is not token ids: a causal LM trains on "
                          "LongTensors [T] or dicts with 'input_ids' (and optional 'attention_mask', "
                          "'labels')")
    return task or found or "classification"


def fit(model: nn.Module, train_data, val_data=None, *, method="noise",
        teacher: Optional[nn.Module] = None, spec: Optional[NoiseSpec] = None, epochs: int = 10,
        batch_size: Optional[int] = None, channels_last="auto", out_dir: Optional[str] = None,
        resume: bool = False,
        overwrite: bool = False, stop_at_step: Optional[int] = None, device=None,
        messages: Callable[[str], None] = print, verbose: bool = True, task: Optional[str] = None,
        **settings) -> TrainResult:
    """Train ``model`` on ``train_data`` with one of the package's methods; returns a
    :class:`~fastnoise.train.trainer.TrainResult` (``.model``: the trained model, the very
    object passed in; ``.history``: one dict per epoch, as ``metrics.csv``; ``.robustness``: the
    table at the end; ``.out_dir``, ``.global_step``, ``.epochs_done``, ``.stopped``).

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to ``[batch, classes]`` logits. It is
            converted in place (:func:`fastnoise.convert` with ``spec`` and ``noise={"exclude":
            [...]}``), moved to the device and trained in place. A model that already has noisy
            layers (one converted before, or returned by an earlier ``fit``, also with
            ``method="clean"``, whose run converts it too: its robustness table needs noisy
            layers) keeps them, their ids and which layers are clean; with ``spec`` given, ``spec``
            replaces every noisy layer's own spec (without, they keep theirs). So a clean model
            from ``fit`` goes on to ``fit(copy.deepcopy(result.model), method="noise",
            spec=NoiseSpec(0.08))``. Replacing the specs rather than returning the model
            unconverted keeps ``result.model`` the very model the robustness table was measured
            on (a table needs noisy layers), the same for every method, and keeps what the
            first conversion decided (which layers are noisy, ``exclude``).
        train_data: a map-style dataset of ``(input tensor, integer label)`` (e.g. a
            ``TensorDataset``), batched by the engine: the order is a function of ``(seed,
            epoch)``, and a sample's augmentation, if it draws from torch's RNG, of ``(seed,
            epoch, index)``, so a resume is exact at any step; ``batch_size`` is the global batch
            (split across processes). Or a ``DataLoader``, used as it is (its batches, sampler,
            collate and workers; ``batch_size`` must then be None). With a loader, ``last.pt`` is
            written at epoch ends only (``checkpoint.every_steps`` must be 0, ``stop_at_step`` a
            multiple of the loader's length) and a run resumes from its last finished epoch;
            that is exact when the loader's order and augmentation come from torch's global RNG
            (``shuffle=True`` without a ``generator``, or a fixed order), which ``last.pt``
            saves, and not when the loader has its own ``generator`` or draws from NumPy's or
            Python's RNG. Under several processes a loader needs a ``DistributedSampler``
            (``set_epoch`` is called each epoch).
        val_data: the same kinds, or None: no validation, no ``best.pt`` and no robustness table.
        method: ``"noise"`` (noise injection), ``"clean"``, ``"kd"`` (needs ``teacher``) or
            ``"consistency"``; or the recipe's ``method`` section as a dict, the name under
            ``"name"`` (default ``"noise"``) with the method's settings:
            ``method={"name": "consistency", "layers": ["layer1"], "lambda": 0.5}``,
            ``method={"name": "kd", "temperature": 4.0, "alpha": 0.5}``.
        teacher: the trained teacher of ``"kd"``; it is not modified (no ``requires_grad`` or
            mode change, no noisy layers), only moved to the device.
        spec: the noise of the converted layers (default: ``noise`` settings, eta 0.06, range).
        epochs: ``schedule.epochs``.
        batch_size: ``data.batch_size`` (default 128).
        channels_last: ``model.channels_last``: ``"auto"`` (on CUDA for a model with
            convolutions), True or False.
        out_dir: the run folder (as ``fastnoise train --out``: config.yaml, last.pt, best.pt,
            model.pth, steps.csv, metrics.csv/json, robustness.csv/png, under a lock); it must be
            new or empty unless ``resume`` or ``overwrite``. None: the run writes into a
            temporary folder that is deleted at the end; nothing is kept, nothing can be resumed.
        resume: continue ``out_dir`` from its ``last.pt``, exactly (the settings must be those
            of the run; give the same model architecture, data, teacher and arguments).
        overwrite: replace the run files of an existing ``out_dir``.
        stop_at_step: stop (saving ``last.pt``) after this many optimizer steps, as if
            interrupted; ``result.stopped`` is then True. Needs ``out_dir``.
        device: torch device (default: ``cuda:LOCAL_RANK`` if CUDA is there, else the CPU).
        messages: where messages go (rank 0 only); ``log=`` is the recipe's section.
        verbose: True (default): the run's messages (the settings, one line per epoch, the
            robustness table at the end) go to ``messages``, with progress bars on a terminal;
            False: nothing is printed (the table is ``result.robustness.table()``).
        task: ``"classification"`` or ``"causal_lm"`` (:mod:`fastnoise.train.lm`: data of
            token ids, a Hugging Face causal LM or any module returning logits ``[B, T, V]``;
            metrics: perplexity and next-token accuracy); None: read from ``train_data[0]``
            (token ids: ``"causal_lm"``). ``method={"name": "kd", "top_k": 64}`` distils a
            causal LM from the teacher's 64 largest logits per token.
        **settings: the recipe's other settings, nested by section as in a recipe's YAML
            (the ``model``, ``teacher`` and ``method`` sections are the arguments above):
            ``optim={"lr": 0.01, "name": "adamw"}``, ``noise={"exclude": ["fc"]}``,
            ``eval={"etas": [0, 0.05], "draws": 5}``,
            ``log={"progress": False}``, ``amp="off"``, ``seed=1``, ``name="mine"``. They are
            checked by the recipe validator: an unknown or bad key is a
            :class:`~fastnoise.train.recipes.ConfigError` (a ``ValueError``) naming it.

    The seed (``seed=``, default 0) sets torch's RNG before training and the noise seed
    (:func:`fastnoise.manual_seed`) before the conversion; the robustness table is measured on
    the chips of that seed (``evaluate_robustness(..., seed=)``), so two models trained by fit
    with the same seed meet the same simulated chips.
    """
    cfg = fit_config(method, spec, epochs, batch_size, channels_last, settings)
    cfg["task"] = resolve_task(task, train_data, val_data)
    if isinstance(train_data, torch.utils.data.DataLoader):
        if batch_size is not None:
            raise ConfigError(f"batch_size={batch_size!r} with a DataLoader: the loader batches the data "
                              "(leave batch_size=None)")
        bs = train_data.batch_size
        if isinstance(bs, int):
            cfg["data"]["batch_size"] = bs  # recorded; the loader's batch sampler is what runs
    respec = False
    if isinstance(model, nn.Module) and noisy_layers(model):
        if "exclude" in (settings.get("noise") or {}):
            raise ConfigError("noise.exclude is for a model fit converts; this model already has noisy "
                              "layers (those it left clean stay clean)")
        respec = spec is not None  # the layers take spec (Trainer, after every check)
        if not respec:
            first = noisy_layers(model)[0][1].spec
            cfg["noise"].update(eta=first.eta, scale=first.scale, noise_bias=first.noise_bias)
    if not isinstance(verbose, bool):
        raise ConfigError(f"verbose must be True or False, got {verbose!r}")
    if not verbose:
        messages = _quiet
        cfg["log"]["progress"] = False
    for name, flag in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False, got {flag!r}")
    tmp = None
    if out_dir is None:
        if resume:
            raise ConfigError("resume=True needs out_dir (the run folder to continue)")
        if stop_at_step is not None:
            raise ConfigError("stop_at_step needs out_dir: without one nothing is kept to resume from")
        tmp = tempfile.mkdtemp(prefix="fastnoise-fit-")
    try:
        trainer = Trainer(cfg, tmp if tmp is not None else os.fspath(out_dir), resume=resume,
                          overwrite=overwrite, stop_at_step=stop_at_step, device=device, log=messages,
                          given=Given(model, train_data, val_data, teacher, respec=respec))
        result = trainer.fit()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if tmp is not None:
        result.out_dir = None
    return result
