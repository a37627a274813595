"""The training loop, the package's only one: one :class:`Trainer` per run folder.

A recipe's run (``fastnoise train``, the demo, the study) builds its model, data and teacher
from the settings; :func:`fastnoise.train.fit` passes the user's instead (:class:`Given`: any
``nn.Module``, a map-style dataset or a ``DataLoader``, a teacher), with ``model.arch`` and
``data.dataset`` null in the settings. Everything after that is the same code.

``Trainer(config, out_dir).fit()`` checks everything it will need (every setting, data folder,
class counts, batch size against the data, the model against the data's shape, teacher file, run
folder) before it writes anything, takes the run folder's lock (``.fastnoise.lock``, held until
``fit`` returns; :mod:`fastnoise.train.runfolder`), then trains and leaves in ``out_dir``:

- ``config.yaml``: the resolved settings;
- ``steps.csv``: step, epoch, loss, lr every ``log.every`` steps (loss averaged over ranks);
- ``metrics.csv`` / ``metrics.json``: one row per epoch (train loss and its terms, train top-1
  under the training noise, clean validation top-1, noisy validation top-1 at the training eta
  over ``eval.epoch_draws`` chips, lr, seconds);
- ``last.pt`` (every epoch, every ``checkpoint.every_steps`` steps, and at ``stop_at_step``):
  model, optimizer, scheduler, GradScaler, the layers' noise ids and call counters, the noise
  seed, torch's RNG states, epoch, step in epoch, the running sums of the epoch's metrics, the
  resolved settings, the metrics rows and the epoch of ``best.pt``; only from finite weights;
  ``best.pt`` (best noisy validation top-1, or clean where there is no noise), written before the
  epoch's ``last.pt``;
- ``model.pth`` (the final weights, a plain ``state_dict``) and ``robustness.csv`` /
  ``robustness.png`` (top-1 mean and std over ``eval.draws`` chips per ``eval.etas``).

Every file is written atomically; on resume ``steps.csv`` is cut back to the checkpoint, the
metrics files are rebuilt from ``last.pt``, and ``config.yaml`` must agree with ``last.pt``. A run
whose loss or weights become non-finite stops with :class:`~fastnoise.train.runfolder.DivergedError`.

Exact resume: the data order is a function of ``(seed, epoch)`` and each sample's augmentation
of ``(seed, epoch, index)`` (:mod:`fastnoise.train.data`), the noise of ``(noise seed, layer id,
call counter)``; all of it is in ``last.pt``, so ``--resume`` continues with the very losses an
uninterrupted run has (bit for bit on the CPU).

Speed: bf16 autocast on CUDA, channels_last for convnets on CUDA, teacher and clean passes
without autograd. Data parallel under ``torchrun`` (:mod:`fastnoise.train.distributed`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .. import rng
from ..convert import clip_weights, convert, load_noise_state_dict, noise_state_dict, noisy_layers
from ..progress import progress_bar
from ..robustness import (
    RobustnessResult,
    TargetError,
    check_targets,
    evaluate_robustness,
    first_bad_target,
    target_range_error,
)
from ..spec import NoiseSpec
from . import checkpoint as ckpt
from . import distributed
from . import runfolder as rf
from .data import EpochBatchSampler, build_data, eval_loader, train_loader
from .errors import ConfigError
from .kinds import check_model_fits, kind_for
from .models import CLASSIFIER, CONVNETS, build_model, build_to_load
from .recipes import load_config_file, validate

__all__ = ["Trainer", "TrainResult", "Given", "train", "RUN_FILES", "teacher_config", "lr_factor",
           "check_model_fits", "CHECKPOINT_VERSION"]

RUN_FILES = ("config.yaml", "last.pt", "best.pt", "model.pth", "steps.csv", "metrics.csv", "metrics.json",
             "robustness.csv", "robustness.png")
CHECKPOINT_VERSION = 2  # 2: last.pt also holds the settings, the metrics rows and best.pt's epoch
# settings a resumed run may change: where the data lives, how it is shown
_RESUMABLE_CHANGES = {"data.root", "data.workers", "data.skip_unreadable", "log.progress", "eval.etas",
                      "eval.draws"}
# how a message names an argument: the CLI's flag, or the Python keyword (Trainer, fit)
_ARGUMENTS = {"resume": ("--resume", "resume=True"), "overwrite": ("--overwrite", "overwrite=True"),
              "out": ("--out", "out_dir"), "stop_at_step": ("--stop-at-step", "stop_at_step")}


@dataclass
class TrainResult:
    """What a run gives back.

    ``out_dir``: the run folder (None for :func:`fastnoise.train.fit` without ``out_dir``: its
    temporary folder is gone); ``metrics`` (also ``history``): one dict per epoch, the rows of
    ``metrics.csv``; ``robustness``: the table at the end (None if stopped, without validation
    data or with ``eval.etas=[]``); ``model``: the trained model (the noisy-layer model, not a
    DDP wrapper).
    """

    out_dir: Optional[str]
    global_step: int
    epochs_done: int
    stopped: bool = False
    metrics: list = field(default_factory=list)
    robustness: Optional[RobustnessResult] = None
    model: Optional[nn.Module] = None

    @property
    def last(self) -> dict:
        return self.metrics[-1] if self.metrics else {}

    @property
    def history(self) -> list:
        return self.metrics


@dataclass
class Given:
    """Pieces of a run given in Python (:func:`fastnoise.train.fit`) instead of built from the
    settings: the model, the training data (a map-style dataset or a ``DataLoader``), the
    validation data (the same kinds, or None) and the teacher (kd). ``respec``: a model that
    already has noisy layers takes the run's spec (``fit(spec=...)``) instead of keeping theirs."""

    model: nn.Module
    train: object
    val: object = None
    teacher: Optional[nn.Module] = None
    respec: bool = False


class _LoaderEpochs:
    """The epoch bookkeeping of a user's ``DataLoader`` (the engine's ``EpochBatchSampler`` for
    datasets): its length, and ``set_epoch`` passed on to a sampler that has one (a
    ``DistributedSampler``). A loader's order cannot be started part way through an epoch, so
    runs with one save and resume at epoch ends only."""

    def __init__(self, loader, world_size: int):
        self.loader = loader
        try:
            self.steps_per_epoch = len(loader)
        except TypeError:
            raise ConfigError("train_data is a DataLoader without a length (an iterable dataset): "
                              "fit needs the number of batches per epoch") from None
        if self.steps_per_epoch < 1:
            raise ConfigError("train_data is a DataLoader that yields no batches")
        self._samplers = [s for s in (getattr(loader, "sampler", None),
                                      getattr(getattr(loader, "batch_sampler", None), "sampler", None))
                          if hasattr(s, "set_epoch")]
        distributed_sampler = any(isinstance(s, torch.utils.data.DistributedSampler) for s in self._samplers)
        if world_size > 1 and not distributed_sampler:
            raise ConfigError(f"train_data is a DataLoader without a DistributedSampler, under {world_size} "
                              "processes: every process would train on all the data; give it "
                              "sampler=DistributedSampler(dataset), or pass the dataset itself")

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if start_step:
            raise ConfigError("a DataLoader cannot be started part way through an epoch")
        for s in self._samplers:
            s.set_epoch(epoch)


def _size(data) -> int:
    """Samples in a dataset or a DataLoader's dataset (batches if it cannot tell)."""
    if data is None:
        return 0
    inner = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
    try:
        return len(inner)
    except TypeError:
        return len(data)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warmup over ``warmup``
    steps (from ``1 / warmup``), then a cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_config(cfg: dict) -> dict:
    """The clean run that trains the teacher when ``teacher.weights`` is unset."""
    t = copy.deepcopy(cfg)
    t["name"] = f"{cfg['name']}-teacher"
    t["model"]["arch"] = cfg["teacher"]["arch"] or cfg["model"]["arch"]
    t["model"]["init"] = None
    t["teacher"] = {"arch": None, "weights": None, "epochs": 0, "lr": None}
    t["method"]["name"] = "clean"
    t["schedule"]["epochs"] = cfg["teacher"]["epochs"]
    if cfg["teacher"]["lr"] is not None:
        t["optim"]["lr"] = cfg["teacher"]["lr"]
    t["eval"]["etas"] = [0.0]
    t["eval"]["epoch_draws"] = 0
    return t


def _logged_rows(path: str, keys: tuple) -> list[tuple]:
    """The int ``keys`` columns of a log's rows that have them (none if there is no such file)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, newline="", errors="replace") as f:
        for row in csv.DictReader(f):
            with contextlib.suppress(TypeError, ValueError):
                out.append(tuple(int(row.get(k)) for k in keys))
    return out


class Trainer:
    """One training run; see the module docstring for what it writes.

    Args:
        config: a configuration (:mod:`fastnoise.train.recipes`), validated here.
        out_dir: the run folder; it must not exist (or be empty) unless ``resume`` or ``overwrite``.
        resume: continue from ``out_dir/last.pt``; the settings must match ``config.yaml`` there.
        overwrite: replace the run files of an existing folder.
        stop_at_step: stop (and save ``last.pt``) after this many optimizer steps in all, as if
            interrupted; ``fit`` then returns with ``stopped=True``.
        progress: progress bars (default: ``log.progress``), drawn on a terminal; elsewhere a
            plain line every tenth of the run (:mod:`fastnoise.progress`).
        device: torch device (default: ``cuda:LOCAL_RANK`` if CUDA is there, else the CPU).
        log: where messages go (rank 0 only).
        given: the model and data (and teacher) given in Python instead of built from the
            settings (:func:`fastnoise.train.fit` passes them; ``model.arch`` and
            ``data.dataset`` are then null). Everything else is the same run.
        cli: messages name the command's flags (``--resume``) instead of these arguments
            (``resume=True``); ``fastnoise train`` sets it.
    """

    def __init__(self, config: dict, out_dir: str, *, resume: bool = False, overwrite: bool = False,
                 stop_at_step: Optional[int] = None, progress: Optional[bool] = None, device=None,
                 log: Callable[[str], None] = print, given: Optional[Given] = None, cli: bool = False):
        self._cli = bool(cli)
        self.cfg = validate(copy.deepcopy(config))
        self.given = given
        self.task = None
        self.out = os.fspath(out_dir)
        self.resume, self.overwrite = resume, overwrite
        if stop_at_step is not None and (isinstance(stop_at_step, bool) or not isinstance(stop_at_step, int)
                                         or stop_at_step < 1):
            raise ConfigError(f"{self._arg('stop_at_step')} must be an int >= 1, got {stop_at_step!r}")
        self.stop_at_step = stop_at_step
        self.progress = self.cfg["log"]["progress"] if progress is None else bool(progress)
        self.device_arg = device
        self._log = log
        self._bar = None
        self._lock: Optional[rf.RunLock] = None
        self._saved = None            # what read_run found in the folder (resume)
        self._saved_step = None       # global step of the newest last.pt (finite weights)

    # ------------------------------------------------------------------ helpers
    def _arg(self, name: str) -> str:
        """``--resume`` from the CLI, ``resume=True`` from Python."""
        return _ARGUMENTS[name][0 if self._cli else 1]

    def log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if self._bar is not None and self._log is print:
            self._bar.write(msg)  # above the progress bar, not through it
        else:
            self._log(msg)

    def _path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def _check_run_folder(self) -> None:
        """May this run write ``out``? Reads only; checked again once the lock is held."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"run folder {self.out!r} exists and is not a folder")
        if self._lock is None:
            rf.check_not_busy(self.out)  # say so first: the files of a running run are in flux
        entries = rf.user_entries(self.out)
        if self.resume:
            saved = rf.read_run(self.out, CHECKPOINT_VERSION, _RESUMABLE_CHANGES)
            if saved.config is None:
                if not os.path.isdir(self.out):
                    raise ConfigError(f"cannot resume: run folder {self.out!r} does not exist")
                hint = (" (the run stopped before it wrote anything: start it again without "
                        f"{self._arg('resume')})"
                        if not entries else "")
                raise ConfigError(f"cannot resume: {self.out!r} has no config.yaml and no last.pt{hint}")
            diff = rf.settings_diff(saved.config, self.cfg, _RESUMABLE_CHANGES)
            if diff is not None:
                key, was, now = diff
                where = "config.yaml" if saved.has_config_file else "last.pt"
                raise ConfigError(f"cannot resume {self.out!r} with other settings: {key} is {was!r} in its "
                                  f"{where}, {now!r} now")
            ck = saved.checkpoint
            if ck is None:
                self._check_never_checkpointed(saved.config)
            if ck is not None and self.stop_at_step is not None and self.stop_at_step <= ck["global_step"]:
                raise ConfigError(f"{self._arg('stop_at_step')} {self.stop_at_step} is not after the "
                                  f"checkpoint's step {ck['global_step']} in {self.out!r}")
            self._saved = saved
        elif entries and not self.overwrite:
            raise ConfigError(f"run folder {self.out!r} already exists; pass {self._arg('resume')} to "
                              f"continue it or {self._arg('overwrite')} to replace it")

    def _check_never_checkpointed(self, cfg: dict) -> None:
        """A resume without last.pt starts from step 0: refused if the logs show that the run went
        past a checkpoint (its last.pt was then lost, and step 0 would silently redo and cut its
        logs). Checkpoints come after the step's log row and after an epoch's metrics row, so a
        step logged after one is the proof: a step of the second epoch or later, a second epoch
        in metrics.csv, or a step past ``checkpoint.every_steps``."""
        steps = _logged_rows(self._path("steps.csv"), ("step", "epoch"))
        epochs = _logged_rows(self._path("metrics.csv"), ("epoch",))
        ck_every = cfg["checkpoint"]["every_steps"]
        proof = None
        if any(epoch >= 1 for _, epoch in steps) or len(epochs) >= 2:
            proof = "its logs show a finished epoch followed by more training"
        elif ck_every and any(step > ck_every for step, _ in steps):
            last = max(step for step, _ in steps)
            proof = f"steps.csv logs step {last}, past the checkpoint at step {ck_every}"
        if proof is not None:
            raise ConfigError(f"cannot resume {self.out!r}: {self._path('last.pt')} is missing, but {proof}; "
                              f"restore last.pt, or start again with {self._arg('overwrite')}")

    def _clear_run_folder(self) -> None:
        """``--overwrite``: last.pt first (a kill part way leaves nothing to resume from), the
        teacher's folder renamed away in one step before it is deleted (never half a teacher)."""
        tdir = self._path("teacher")
        if os.path.isfile(os.path.join(tdir, "config.yaml")):
            gone = self._path(f".teacher.tmp-{os.getpid()}")
            os.replace(tdir, gone)
            rf.fsync_dir(self.out)
            rf.fault("delete", tdir)
            shutil.rmtree(gone)
        for name in ("last.pt", *[n for n in RUN_FILES if n != "last.pt"]):
            if os.path.isfile(self._path(name)):
                rf.fault("delete", self._path(name))
                os.remove(self._path(name))
        # the replaced run's `fastnoise eval --run` tables (OUT/eval) describe a model that is gone
        edir = self._path("eval")
        if os.path.isdir(edir):
            gone = self._path(f".eval.tmp-{os.getpid()}")
            os.replace(edir, gone)
            rf.fsync_dir(self.out)
            rf.fault("delete", edir)
            shutil.rmtree(gone)

    def _raise_from_main(self, err: Optional[Exception]) -> None:
        """Raise rank 0's error on every rank (rank 0 alone writes; the others would wait)."""
        msg = distributed.broadcast_object(None if err is None else str(err), self.dist)
        if err is not None:
            raise err
        if msg is not None:
            raise ConfigError(msg)

    def _raise_from_any(self, err: Optional[Exception]) -> None:
        """Every rank raises if one found an error (one process: ``err`` itself); also the point
        where the ranks meet before rank 0 writes."""
        msgs = distributed.all_objects(None if err is None else str(err), self.dist)
        if err is not None:
            raise err
        first = next((m for m in msgs if m is not None), None)
        if first is not None:
            raise ConfigError(first)

    def _open_run_folder(self) -> None:
        """Take the folder's lock; only then clear (``--overwrite``), tidy and write config.yaml."""
        err = None
        if self.dist.is_main:
            try:
                try:
                    os.makedirs(self.out, exist_ok=True)
                except OSError as e:
                    raise rf.RunFolderError(f"cannot create run folder {self.out!r}: "
                                            f"{e.strerror or e}") from e
                self._lock = rf.RunLock(self.out).acquire()
                self._check_run_folder()  # again: another process may have changed it before we held the lock
                try:
                    if self.overwrite and not self.resume:
                        self._clear_run_folder()
                    removed = rf.remove_stray_temps(self.out)
                except OSError as e:
                    raise rf.RunFolderError(f"cannot clear {self.out!r}: {e.strerror or e}") from e
                if removed:
                    self.log(f"removed {len(removed)} temporary file(s) an interrupted run left: "
                             f"{', '.join(removed)}")
                path = self._path("config.yaml")
                if not self.resume:
                    rf.dump_config(self.cfg, path)
                elif not os.path.isfile(path):
                    self.log(f"{path} was missing: written again from last.pt's settings")
                    rf.dump_config(self.cfg, path)
                elif rf.flatten(load_config_file(path)) != rf.flatten(self.cfg):
                    rf.dump_config(self.cfg, path)  # a resumable setting changed: record what runs now
            except ConfigError as e:
                err = e
        self._raise_from_main(err)

    def _close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _teacher_arch(self) -> str:
        return self.cfg["teacher"]["arch"] or self.cfg["model"]["arch"]

    def _needs_teacher(self) -> bool:
        return self.cfg["method"]["name"] == "kd" or self.cfg["model"]["init"] == "teacher"

    def _check_given(self) -> tuple:
        """The given model and data fit each other (the kind's check: for a classifier one batch
        of two validation samples through the model in eval mode, without autograd: no state
        changes); returns the class count, the model's name and whether it has convolutions.
        Checked before anything is written."""
        g, cfg = self.given, self.cfg
        if not isinstance(g.model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(g.model).__name__}")
        for key in ("model.arch", "data.dataset", "model.init", "teacher.weights"):
            section, leaf = key.split(".")
            if cfg[section][leaf] is not None:
                raise ConfigError(f"{key} must be null when the model and data are given, got "
                                  f"{cfg[section][leaf]!r}")
        if cfg["teacher"]["epochs"]:
            raise ConfigError("teacher.epochs must be 0 when the model is given: pass the teacher")
        kd = cfg["method"]["name"] == "kd"
        if kd and g.teacher is None:
            raise ConfigError("method 'kd' needs a teacher: pass teacher=MODEL (a trained nn.Module)")
        if not kd and g.teacher is not None:
            raise ConfigError(f"a teacher is for method 'kd', not {cfg['method']['name']!r}")
        if g.teacher is not None and not isinstance(g.teacher, nn.Module):
            raise ConfigError(f"teacher must be an nn.Module, got {type(g.teacher).__name__}")
        if g.teacher is g.model:
            raise ConfigError("teacher is the model itself: pass a separate trained model "
                              "(e.g. copy.deepcopy(model) before training it)")
        names = cfg["method"]["layers"] if cfg["method"]["name"] == "consistency" else []
        modules = dict(g.model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            known = [n for n in modules if n][:12]
            raise ConfigError(f"method.layers: no module named {unknown[0]!r} in the model "
                              f"(some names it has: {known})")
        if g.val is not None and _size(g.val) == 0:
            raise ConfigError("val_data has no samples")
        params = list(g.model.parameters())
        if not any(p.requires_grad for p in params):
            why = (f"all {len(params)} of its parameter tensors are frozen (requires_grad=False)" if params
                   else "it has no parameters")
            raise ConfigError(f"the model has nothing to train: {why}")
        return self.kind.check_given(self)  # the data, and the model (and teacher) on them

    def _check_teacher_settings(self) -> None:
        t, m = self.cfg["teacher"], self.cfg["model"]
        if not self._needs_teacher():
            return
        if t["weights"] is None and t["epochs"] == 0:
            why = "method kd" if self.cfg["method"]["name"] == "kd" else "model.init=teacher"
            raise ConfigError(f"{why} needs a teacher: set teacher.weights=FILE (a state_dict) or "
                              "teacher.epochs=N to train a clean one first")
        if m["init"] == "teacher" and self._teacher_arch() != m["arch"]:
            raise ConfigError(f"model.init=teacher needs teacher.arch == model.arch, got "
                              f"{self._teacher_arch()!r} and {m['arch']!r}")
        if t["weights"] is None:  # a clean teacher is trained first: its settings must hold too
            try:
                validate(teacher_config(self.cfg))
            except ConfigError as e:
                raise ConfigError(f"the teacher run (teacher.epochs={t['epochs']}): {e}") from None

    def _check_layers(self, data) -> None:
        """Consistency's module names exist in the model, and the models fit the data (checked
        before anything is written)."""
        names = self.cfg["method"]["layers"] if self.cfg["method"]["name"] == "consistency" else []
        arch = self.cfg["model"]["arch"]
        if names:
            with torch.device("meta"):  # names only: no memory, no initialisation
                modules = dict(build_model(arch, self.num_classes).named_modules())
            unknown = [n for n in names if n not in modules]
            if unknown:
                known = [n for n in modules if n][:12]
                raise ConfigError(f"method.layers: no module named {unknown[0]!r} in {arch} "
                                  f"(some names it has: {known})")
        teacher = self._teacher_arch() if self._needs_teacher() and self._teacher_arch() != arch else None
        self.kind.check_built(self.cfg, data, names, teacher)

    def _load_teacher(self, path: str, num_classes: int) -> nn.Module:
        arch = self._teacher_arch()
        teacher, assign = build_to_load(arch, num_classes)  # no initialisation where it can
        ckpt.load_weights(teacher, path, "teacher", arch, CLASSIFIER[arch], num_classes, assign=assign)
        return teacher

    def _amp_dtype(self) -> Optional[torch.dtype]:
        amp = self.cfg["amp"]
        if amp == "auto":
            return torch.bfloat16 if self.dist.device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]

    def _channels_last(self) -> bool:
        cl = self.cfg["model"]["channels_last"]
        if cl == "auto":
            return self.dist.device.type == "cuda" and self._convnet
        return bool(cl)

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg["optim"]
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": o["weight_decay"]},
                  {"params": no_decay, "weight_decay": 0.0}]  # biases and norm scales
        if o["name"] == "sgd":
            return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"],
                                   nesterov=o["nesterov"] and o["momentum"] > 0)
        return torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]))

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        """Check everything, then create the run folder and build the model, task and optimizer."""
        cfg = self.cfg
        self.dist = distributed.setup(self.device_arg)
        self.kind = kind_for(cfg["task"])
        # every rank checks (reading only); none writes before all have finished, so a
        # rank's checks never see rank 0's first writes (its lock, a new config.yaml)
        err = None
        try:
            self._check_run_folder()
            d = cfg["data"]
            if self.given is None:
                data = build_data(cfg)
                want = cfg["data"]["num_classes"]
                if want is not None and want != data.num_classes:
                    raise ConfigError(f"data.num_classes={want} but the data has {data.num_classes} classes")
                self._check_teacher_settings()
                self.num_classes = data.num_classes
                self._check_layers(data)
                train_set, val_set = data.train, data.val
                self._model_name, self._data_name = cfg["model"]["arch"], cfg["data"]["dataset"]
                self._convnet = cfg["model"]["arch"] in CONVNETS
            else:
                self.num_classes, self._model_name, self._convnet = self._check_given()
                train_set, val_set = self.given.train, self.given.val
                self._data_name = "the given data"
            self._loader_given = isinstance(train_set, torch.utils.data.DataLoader)
            if self._loader_given:
                self.sampler = _LoaderEpochs(train_set, self.dist.world_size)
                spe = self.sampler.steps_per_epoch
                if cfg["checkpoint"]["every_steps"]:
                    raise ConfigError("checkpoint.every_steps must be 0 when train_data is a DataLoader: "
                                      "a run with one saves (and resumes) at epoch ends only")
                if self.stop_at_step is not None and self.stop_at_step % spe:
                    raise ConfigError(f"stop_at_step={self.stop_at_step} is not at an epoch end ({spe} "
                                      "steps per epoch): a run with a DataLoader stops and resumes at "
                                      "epoch ends only")
            else:
                self.sampler = EpochBatchSampler(len(train_set), d["batch_size"], cfg["seed"], self.dist.rank,
                                                 self.dist.world_size)
            self._data_sizes = [_size(train_set), _size(val_set)]
            ck = self._saved.checkpoint if self._saved is not None else None
            if ck is not None and ck.get("data_sizes") is not None:
                self._check_same_data(ck["data_sizes"], self._path("last.pt"))
            teacher = self.given.teacher if self.given is not None else None
            tw = cfg["teacher"]["weights"]
            if self._needs_teacher() and tw is not None:
                teacher = self._load_teacher(os.path.expanduser(str(tw)), self.num_classes)
            init = cfg["model"]["init"]
            if init not in (None, "teacher"):  # read and check it now, before anything is written
                arch = cfg["model"]["arch"]
                probe, assign = build_to_load(arch, self.num_classes)
                ckpt.load_weights(probe, os.path.expanduser(init), "model.init", arch, CLASSIFIER[arch],
                                  self.num_classes, assign=assign)
                del probe
        except ConfigError as e:
            err = e
        self._raise_from_any(err)

        # everything is checked: from here on files are written, under the folder's lock
        self._open_run_folder()
        distributed.barrier(self.dist)

        if self._needs_teacher() and teacher is None:  # train a clean teacher first
            teacher = self._train_teacher()

        torch.manual_seed(cfg["seed"])
        rng.manual_seed(cfg["seed"])
        n = cfg["noise"]
        self.spec = NoiseSpec(eta=n["eta"], scale=n["scale"], noise_bias=n["noise_bias"])
        if self.given is None:
            arch = cfg["model"]["arch"]
            model = build_model(arch, self.num_classes)
            if init == "teacher":
                model.load_state_dict(teacher.state_dict())
            elif init is not None:
                ckpt.load_weights(model, os.path.expanduser(init), "model.init", arch, CLASSIFIER[arch],
                                  self.num_classes)
        else:
            model = self.given.model
        if self.given is None or not noisy_layers(model):  # a model with noisy layers keeps them
            convert(model, self.spec, exclude=n["exclude"] or None)
        elif self.given.respec:
            for _, layer in noisy_layers(model):
                layer.spec = self.spec
        dev = self.dist.device
        fmt = torch.channels_last if self._channels_last() else torch.contiguous_format
        model.to(dev, memory_format=fmt)
        self.base = model
        self.model = model
        if self.dist.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None)

        self.task = self.kind.make_task(self, teacher, fmt)

        pin = dev.type == "cuda"
        if self._loader_given:
            self.train_loader = train_set
        else:
            self.train_loader = train_loader(train_set, self.sampler, d["workers"], pin)
        if val_set is None or isinstance(val_set, torch.utils.data.DataLoader):
            self.val_loader = val_set
        else:
            self.val_loader = eval_loader(val_set, d["eval_batch_size"], d["workers"], pin, self.dist.rank,
                                          self.dist.world_size)
        self.optimizer = self._optimizer(self.base)
        spe = self.sampler.steps_per_epoch
        s = cfg["schedule"]
        self.total_steps = s["epochs"] * spe
        warmup = round(s["warmup_epochs"] * spe)
        min_ratio = s["min_lr"] / cfg["optim"]["lr"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, warmup, self.total_steps, min_ratio))
        self.amp_dtype = self._amp_dtype()
        self.scaler = (torch.amp.GradScaler(dev.type) if self.amp_dtype == torch.float16 else None)

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best, self.best_epoch = self.kind.initial_best, 0
        self.sums: dict = {}
        self.metrics: list = []
        if self.resume and os.path.isfile(self._path("last.pt")):
            self._load_checkpoint()
        elif self.resume:
            self.log(f"resuming {self.out} from step 0: it has no last.pt yet")
        if self.dist.is_main and self.resume:
            self._repair_logs()

    def _train_teacher(self) -> nn.Module:
        tdir = self._path("teacher")
        tcfg = teacher_config(self.cfg)
        weights = os.path.join(tdir, "model.pth")
        if not os.path.isfile(weights):
            self.log(f"training a clean teacher ({tcfg['model']['arch']}, "
                     f"{tcfg['schedule']['epochs']} epochs) in {tdir}")
            resume = os.path.isfile(os.path.join(tdir, "config.yaml"))
            Trainer(tcfg, tdir, resume=resume, overwrite=not resume, progress=self.progress,
                    device=self.dist.device, log=self._log, cli=self._cli).fit()
        return self._load_teacher(weights, self.num_classes)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.base.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "noise": noise_state_dict(self.base),
            "noise_seed": rng.initial_seed(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "sums": {k: float(v) for k, v in self.sums.items()},
            "best": self.best,
            "best_epoch": self.best_epoch,
            "world_size": self.dist.world_size,
            "data_sizes": self._data_sizes,
            "config": self.cfg,
            "metrics": self.metrics,
        }

    def _nonfinite_input(self, since: int) -> Optional[str]:
        """The first training sample of this epoch's steps ``since + 1 ..`` now whose input is not
        finite (read again from the data, on the failure path only; at most the last
        ``log.every`` steps, those since the loss was last seen finite), or None."""
        if self._loader_given or not isinstance(self.sampler, EpochBatchSampler):
            return None
        since = max(since, self.step_in_epoch - self.cfg["log"]["every"])
        samples = self.train_loader.dataset
        self.sampler.set_epoch(self.epoch, since)
        for k, batch in enumerate(self.sampler):
            step = since + k + 1
            if step > self.step_in_epoch:
                break
            for pos, item in enumerate(batch):
                sample = samples[item]
                x = sample[0] if isinstance(sample, (tuple, list)) and sample else None
                if not isinstance(x, torch.Tensor) or not x.is_floating_point() or bool(x.isfinite().all()):
                    continue
                kind = "nan" if bool(torch.isnan(x).any()) else "inf"
                at = self.global_step - self.step_in_epoch + step
                return (f"the training data are not finite: sample {item[0]} (position {pos} of the batch of "
                        f"step {at}, epoch {self.epoch + 1}) holds {kind}")
        return None

    def _diverged(self, what: str, since: Optional[int] = None) -> Exception:
        """The error of a run whose loss or weights became non-finite, naming the likely cause:
        non-finite training inputs (a ConfigError naming the sample) when the steps since the loss
        was last seen finite (``since``, a step of this epoch) read one."""
        if since is not None:
            bad = self._nonfinite_input(since)
            if bad is not None:
                return ConfigError(f"training stopped at step {self.global_step}: {what}, because {bad}; "
                                   "clean or drop those samples")
        n, o = self.cfg["noise"], self.cfg["optim"]
        eta = f"noise.eta={n['eta']:g} ({n['scale']} scale)"
        lr = f"optim.lr={o['lr']:g}"
        first, second = (eta, lr) if n["eta"] >= 0.5 else (lr, eta)
        amp = ", or fp16 overflow (amp=fp16)" if self.amp_dtype == torch.float16 else ""
        if self._saved_step is not None:
            kept = f"{self._path('last.pt')} keeps step {self._saved_step}, the last finite weights"
        else:
            kept = "No checkpoint was written from non-finite weights"
        return rf.DivergedError(f"training diverged at step {self.global_step} (epoch {self.epoch + 1}): "
                                f"{what}. Likely cause: {first} is too large (else {second}{amp}). "
                                f"{kept}; start again with a lower value ({self._arg('overwrite')}, or "
                                f"another {self._arg('out')})")

    def _check_finite(self) -> None:
        """Nothing is saved from non-finite weights or optimizer state."""
        bad = rf.first_nonfinite({"model": self.base.state_dict(), "optimizer": self.optimizer.state_dict()})
        if bad is not None:
            raise self._diverged(f"{bad} is not finite")

    def _save(self, name: str = "last.pt") -> None:
        self._check_finite()
        err = None
        if self.dist.is_main:
            try:
                if name == "last.pt":  # the log rows it covers are on disk before it is
                    rf.sync_file(self._path("steps.csv"))
                ckpt.save_atomic(self._state(), self._path(name))
            except ConfigError as e:
                err = e
        self._raise_from_main(err)
        if name == "last.pt":
            self._saved_step = self.global_step

    def _load_checkpoint(self) -> None:
        path = self._path("last.pt")
        state = ckpt.load_file(path, "checkpoint")
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(f"{path!r} is not a fastnoise checkpoint of version {CHECKPOINT_VERSION}")
        bad = rf.first_nonfinite(state.get("model"))
        if bad is not None:
            raise ConfigError(f"{path!r} holds non-finite weights ({bad}): it is damaged")
        try:
            self.base.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            rng.manual_seed(int(state["noise_seed"]))
            load_noise_state_dict(self.base, state["noise"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
            self.global_step = int(state["global_step"])
            dev = self.dist.device
            self.sums = {k: torch.tensor(v, dtype=torch.float64, device=dev)
                         for k, v in state["sums"].items()}
            self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
            self.metrics = [dict(r) for r in state["metrics"]]
            sizes = [int(n) for n in state["data_sizes"]]
            if self._loader_given and self.step_in_epoch:
                raise ValueError(f"step {self.step_in_epoch} of an epoch, but a DataLoader resumes at "
                                 "epoch ends")
            if not 0 <= self.step_in_epoch <= self.sampler.steps_per_epoch or len(self.metrics) != self.epoch:
                raise ValueError(f"epoch {self.epoch}, step in epoch {self.step_in_epoch}, "
                                 f"{len(self.metrics)} metrics rows")
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise ConfigError(f"{path!r} does not fit this run ({rf.first_line(e)}): it is damaged or was "
                              "written by another run") from e
        self._check_same_data(sizes, path)
        self._saved_step = self.global_step
        self.log(f"resumed {self.out} at epoch {self.epoch}, step {self.global_step}")

    def _check_same_data(self, sizes, path: str) -> None:
        if list(sizes) != self._data_sizes:  # data.root may move, not change
            where = (f"the data at data.root={self.cfg['data']['root']!r}" if self.given is None
                     else "the given data")
            raise ConfigError(f"{where} has {self._data_sizes[0]} "
                              f"training and {self._data_sizes[1]} validation samples, but {path!r} was "
                              f"trained on {sizes[0]} and {sizes[1]}: it is other data")

    def _repair_logs(self) -> None:
        """Bring the logs back to the checkpoint: steps.csv cut to its last complete row at or
        before the checkpoint's step, metrics.csv / metrics.json written again from last.pt."""
        path = self._path("steps.csv")
        got = rf.repair_csv(path, "step", self.global_step)
        spe, every = self.sampler.steps_per_epoch, self.cfg["log"]["every"]
        want = sum(1 for s in range(1, self.global_step + 1) if s % every == 0 or s % spe == 0)
        kept, dropped = got if got is not None else (0, 0)
        if dropped:
            self.log(f"{path}: dropped {dropped} row(s) written after the checkpoint or damaged")
        if kept < want:
            self.log(f"fastnoise: warning: {path} has {kept} of the {want} rows up to step "
                     f"{self.global_step}; the others were lost (the file was damaged)")
        self._write_metrics()
        stale = [n for n in ("model.pth", "robustness.csv", "robustness.png")
                 if self.epoch < self.cfg["schedule"]["epochs"] and os.path.isfile(self._path(n))]
        if self.best_epoch == 0 and os.path.isfile(self._path("best.pt")):
            stale.append("best.pt")  # no epoch of this checkpoint's run has finished
        for n in stale:
            os.remove(self._path(n))
        if stale:
            self.log(f"removed {', '.join(stale)}: newer than {self._path('last.pt')}, or from before it")
        if self.cfg["checkpoint"]["best"] and self.best_epoch > 0:
            bpath = self._path("best.pt")
            try:
                b = ckpt.load_file(bpath, "best checkpoint", mmap=True)
                epoch = b.get("epoch") if isinstance(b, dict) else None
                ahead = isinstance(epoch, int) and epoch > self.epoch  # written just before a kill: redone
                problem = None if epoch == self.best_epoch or ahead else f"it is of epoch {epoch!r}"
            except ConfigError as e:
                problem = str(e)
            if problem is not None:
                self.log(f"fastnoise: warning: {bpath} does not hold the best epoch ({self.best_epoch}): "
                         f"{problem}; it is written again when an epoch beats {self.best:.2f}")

    # ------------------------------------------------------------------ logging
    def _append_csv(self, name: str, row: dict) -> None:
        rf.append_row(self._path(name), row)

    def _write_metrics(self) -> None:
        """metrics.csv and metrics.json, each written whole (atomically) from ``self.metrics``."""
        for name in ("metrics.csv", "metrics.json"):
            path = self._path(name)
            if not self.metrics:
                if os.path.isfile(path):
                    os.remove(path)
                continue
            if name == "metrics.json":
                rf.write_text(path, json.dumps(self.metrics, indent=1))
            else:
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=list(self.metrics[0]))
                w.writeheader()
                w.writerows(self.metrics)
                rf.write_text(path, buf.getvalue())

    def _add(self, key: str, value: torch.Tensor) -> None:
        v = value.detach().to(torch.float64)
        self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()

    # ------------------------------------------------------------------ evaluation
    def _eval_kwargs(self) -> dict:
        return {"device": self.dist.device, "autocast_dtype": self.amp_dtype,
                "channels_last": self._channels_last(), "distributed": self.dist.distributed,
                "progress": False}

    def _validate(self) -> dict:
        return self.kind.validate(self)

    def evaluate(self, etas=None, draws=None, seed: Optional[int] = None) -> RobustnessResult:
        """The robustness table of the current model on the validation set, on the simulated
        chips of ``seed`` (default: the run's ``seed``; :func:`fastnoise.evaluate_robustness`'s
        ``seed=``, which names each layer's chip by its place in the model), so the models of
        runs with the same seed meet the very same chips whatever built them."""
        if self.val_loader is None:
            raise ConfigError("this run has no validation data to evaluate on")
        e = self.cfg["eval"]
        kw = {**self._eval_kwargs(), **self.kind.robustness_kwargs()}
        kw["progress"] = self.progress and self.dist.is_main
        result = evaluate_robustness(self.base, self.val_loader, e["etas"] if etas is None else etas,
                                     e["draws"] if draws is None else draws, name=self.cfg["name"],
                                     seed=self.cfg["seed"] if seed is None else seed, **kw)
        result.name = self.cfg["name"]  # evaluate_robustness(seed=) names it after its last layer
        return result

    # ------------------------------------------------------------------ training
    def _check_batch_labels(self, y) -> None:
        """The labels of this step's batch, before the forward (torch's own errors come after the
        run folder is written and name no sample): on the CPU, where the loader gives them, one
        aminmax of a batch of ints."""
        where = f"the training batch of step {self.global_step + 1} (epoch {self.epoch + 1})"
        n = len(y) if isinstance(y, torch.Tensor) and y.dim() else 0
        try:
            check_targets(y, n, where)
        except TargetError as e:
            raise ConfigError(str(e)) from None
        if n and y.device.type == "cpu" and self.num_classes is not None:
            lo, hi = torch.aminmax(y)
            if int(lo) < 0 or int(hi) >= self.num_classes:
                raise ConfigError(target_range_error(y, first_bad_target(y, self.num_classes),
                                                     self.num_classes, where))

    def _step(self, batch) -> dict:
        self.kind.check_batch(self, batch)
        dev = self.dist.device
        inputs = self.kind.inputs(batch, dev, self._channels_last())
        amp = (torch.autocast(dev.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            out = self.task(*inputs)
        loss = out["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        clip_weights(self.base)  # the crossbar tile's weight clipping (TileSpec.clip), if any
        self.scheduler.step()
        for k, v in self.kind.sums(out, inputs).items():
            self._add(k, v)
        return out

    def _epoch_row(self, seconds: float) -> dict:
        keys = sorted(self.sums)
        sums = distributed.all_reduce_sum([self.sums[k] for k in keys], self.dist)
        totals = dict(zip(keys, sums, strict=True))
        n = max(totals.get("samples", 0.0), 1.0)
        row = {"epoch": self.epoch + 1, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": totals.get("loss", 0.0) / n}
        for k in ("ce", "kd", "consistency"):
            if k in totals:
                row[f"train_{k}"] = totals[k] / n
        row.update(self.kind.train_row(totals, n))
        row.update(self._validate())
        row["seconds"] = round(seconds, 3)
        return row

    def fit(self) -> TrainResult:
        """Check, train, evaluate; the run folder is locked from the first write to the return."""
        try:
            self._setup()
            return self._fit()
        finally:
            if self.task is not None:
                self.task.close()  # hooks off the model (consistency), also after an error
            self._close()

    def _stop_now(self) -> bool:
        return self.stop_at_step is not None and self.global_step >= self.stop_at_step

    def _stop(self, save: bool) -> TrainResult:
        """``stop_at_step``: as if interrupted there, with ``last.pt`` written."""
        self._bar = None
        if save:
            self._save()
        self.task.close()  # hooks off the model
        self.log(f"stopped at step {self.global_step}; continue with {self._arg('resume')}")
        return TrainResult(self.out, self.global_step, self.epoch, True, self.metrics, model=self.base)

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        spe = self.sampler.steps_per_epoch
        epochs = cfg["schedule"]["epochs"]
        every, ck_every = cfg["log"]["every"], cfg["checkpoint"]["every_steps"]
        classes = f" ({self.num_classes} {self.kind.classes})" if self.num_classes is not None else ""
        noise = "no noise" if cfg["method"]["name"] == "clean" else f"noise {self.spec}"
        self.log(f"{cfg['name']}: {cfg['method']['name']} on {self._data_name}"
                 f"{classes}, {self._model_name}, {noise}, "
                 f"{epochs} epochs x {spe} steps, global batch {cfg['data']['batch_size']}, "
                 f"{self.dist.world_size} process(es) on {self.dist.device}")
        bar_cm = contextlib.nullcontext(None)
        if self.progress and self.dist.is_main:  # a bar on a terminal, else a line a tenth
            bar_cm = progress_bar(self.total_steps, cfg["name"], initial=self.global_step)
        with bar_cm as bar:
            self._bar = bar
            while self.epoch < epochs:
                t0 = time.perf_counter()
                self.base.train()
                self.task.train()
                self.sampler.set_epoch(self.epoch, self.step_in_epoch)
                checked = self.step_in_epoch
                for batch in self.train_loader:
                    out = self._step(batch)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    rf.fault("step")
                    if self.global_step % every == 0 or self.step_in_epoch == spe:
                        loss = distributed.all_reduce_sum([out["loss"].detach()], self.dist)[0]
                        loss /= self.dist.world_size
                        if self.dist.is_main:
                            self._append_csv("steps.csv", {"step": self.global_step, "epoch": self.epoch,
                                                           "loss": repr(loss),
                                                           "lr": repr(self.optimizer.param_groups[0]["lr"])})
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.4f}", epoch=self.epoch + 1)
                        if not math.isfinite(loss):
                            raise self._diverged(f"the loss is {loss}", checked)
                        checked = self.step_in_epoch  # the loss was finite up to here
                    if bar is not None:
                        bar.update(1)
                    # a DataLoader stops at the epoch's end, after the epoch is recorded (below)
                    if self._stop_now() and not self._loader_given:
                        return self._stop(save=True)
                    if ck_every and self.global_step % ck_every == 0 and self.step_in_epoch < spe:
                        self._save()
                row = self._epoch_row(time.perf_counter() - t0)
                if not math.isfinite(row["train_loss"]):
                    raise self._diverged(f"the epoch's mean loss is {row['train_loss']}", 0)
                self._check_finite()
                self.epoch += 1
                self.step_in_epoch = 0
                self.sums = {}
                score = self.kind.score(row)
                improved = score is not None and score > self.best
                if improved:
                    self.best, self.best_epoch = score, self.epoch
                self.metrics.append(row)
                if self.dist.is_main:
                    self._write_metrics()
                    self.log(f"epoch {row['epoch']}/{epochs}: {self.kind.epoch_message(row)}")
                # best.pt before last.pt: a kill between the two leaves last.pt at the previous
                # epoch, which the resumed run redoes (writing the same best.pt again)
                if improved and cfg["checkpoint"]["best"]:
                    self._save("best.pt")
                self._save()
                if self._stop_now():
                    return self._stop(save=False)
            self._bar = None
        self._check_finite()
        err = None
        self.task.close()  # hooks off the model (consistency), before the final evaluation
        if self.dist.is_main:
            try:
                ckpt.save_atomic(self.base.state_dict(), self._path("model.pth"))
            except ConfigError as e:
                err = e
        self._raise_from_main(err)
        result = None
        if cfg["eval"]["etas"] and self.val_loader is not None:
            result = self.evaluate()
            if self.dist.is_main:
                with rf.atomic_path(self._path("robustness.csv")) as tmp:
                    result.to_csv(tmp)
                with rf.atomic_path(self._path("robustness.png")) as tmp:
                    result.plot(tmp, title=f"{cfg['name']} ({cfg['method']['name']})")
                self.log(result.table())
        distributed.barrier(self.dist)
        return TrainResult(self.out, self.global_step, self.epoch, False, self.metrics, result, self.base)


def train(config: dict, out_dir: str, **kwargs) -> TrainResult:
    """``Trainer(config, out_dir, **kwargs).fit()``."""
    return Trainer(config, out_dir, **kwargs).fit()
