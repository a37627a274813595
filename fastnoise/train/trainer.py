"""The training loop: one :class:`Trainer` per run folder.

``Trainer(config, out_dir).fit()`` checks everything it will need (data folder, class counts,
teacher file, run folder) before it writes anything, then trains and leaves in ``out_dir``:

- ``config.yaml``: the resolved settings;
- ``steps.csv``: step, epoch, loss, lr every ``log.every`` steps (loss averaged over ranks);
- ``metrics.csv`` / ``metrics.json``: one row per epoch (train loss and its terms, train top-1
  under the training noise, clean validation top-1, noisy validation top-1 at the training eta
  over ``eval.epoch_draws`` chips, lr, seconds);
- ``last.pt`` (every epoch, every ``checkpoint.every_steps`` steps, and at ``stop_at_step``):
  model, optimizer, scheduler, GradScaler, the layers' noise ids and call counters, the noise
  seed, torch's RNG states, epoch, step in epoch and the running sums of the epoch's metrics;
  ``best.pt`` (best noisy validation top-1, or clean where there is no noise);
- ``model.pth`` (the final weights, a plain ``state_dict``) and ``robustness.csv`` /
  ``robustness.png`` (top-1 mean and std over ``eval.draws`` chips per ``eval.etas``).

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
from ..modules import convert, load_noise_state_dict, noise_state_dict
from ..robustness import RobustnessResult, evaluate_robustness
from ..spec import NoiseSpec
from . import checkpoint as ckpt
from . import distributed
from .data import EpochBatchSampler, build_data, eval_loader, train_loader
from .models import CLASSIFIER, CONVNETS, build_model
from .recipes import ConfigError, dump_config, load_recipe, validate
from .tasks import ClassificationTask, ConsistencyTask, DistillationTask, FrozenTeacher

__all__ = ["Trainer", "TrainResult", "train", "RUN_FILES", "teacher_config", "lr_factor"]

RUN_FILES = ("config.yaml", "last.pt", "best.pt", "model.pth", "steps.csv", "metrics.csv", "metrics.json",
             "robustness.csv", "robustness.png")
CHECKPOINT_VERSION = 1
# settings a resumed run may change: where the data lives, how it is shown
_RESUMABLE_CHANGES = {"data.root", "data.workers", "log.progress", "eval.etas", "eval.draws"}


@dataclass
class TrainResult:
    out_dir: str
    global_step: int
    epochs_done: int
    stopped: bool = False
    metrics: list = field(default_factory=list)
    robustness: Optional[RobustnessResult] = None

    @property
    def last(self) -> dict:
        return self.metrics[-1] if self.metrics else {}


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps: linear warmup over ``warmup``
    steps (from ``1 / warmup``), then a cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


class Trainer:
    """One training run; see the module docstring for what it writes.

    Args:
        config: a configuration (:mod:`fastnoise.train.recipes`), validated here.
        out_dir: the run folder; it must not exist (or be empty) unless ``resume`` or ``overwrite``.
        resume: continue from ``out_dir/last.pt``; the settings must match ``config.yaml`` there.
        overwrite: replace the run files of an existing folder.
        stop_at_step: stop (and save ``last.pt``) after this many optimizer steps in all, as if
            interrupted; ``fit`` then returns with ``stopped=True``.
        progress: tqdm bars (default: ``log.progress``).
        device: torch device (default: ``cuda:LOCAL_RANK`` if CUDA is there, else the CPU).
        log: where messages go (rank 0 only).
    """

    def __init__(self, config: dict, out_dir: str, *, resume: bool = False, overwrite: bool = False,
                 stop_at_step: Optional[int] = None, progress: Optional[bool] = None, device=None,
                 log: Callable[[str], None] = print):
        self.cfg = validate(copy.deepcopy(config))
        self.out = os.fspath(out_dir)
        self.resume, self.overwrite = resume, overwrite
        if stop_at_step is not None and (isinstance(stop_at_step, bool) or not isinstance(stop_at_step, int)
                                         or stop_at_step < 1):
            raise ValueError(f"stop_at_step must be an int >= 1, got {stop_at_step!r}")
        self.stop_at_step = stop_at_step
        self.progress = self.cfg["log"]["progress"] if progress is None else bool(progress)
        self.device_arg = device
        self._log = log
        self._bar = None

    # ------------------------------------------------------------------ helpers
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
        exists = os.path.isdir(self.out) and bool(os.listdir(self.out))
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"run folder {self.out!r} exists and is not a folder")
        if self.resume:
            # a run stopped while its teacher was being trained has no last.pt yet
            teacher_started = os.path.isfile(os.path.join(self._path("teacher"), "config.yaml"))
            if not os.path.isfile(self._path("last.pt")) and not teacher_started:
                raise ConfigError(f"cannot resume: {self.out!r} has no last.pt")
            if os.path.isfile(self._path("config.yaml")):
                saved = _flatten(load_recipe(self._path("config.yaml")))
                now = _flatten(self.cfg)
                for key in sorted(set(saved) | set(now)):
                    if key not in _RESUMABLE_CHANGES and saved.get(key) != now.get(key):
                        raise ConfigError(f"cannot resume {self.out!r} with other settings: {key} is "
                                          f"{saved.get(key)!r} in its config.yaml, {now.get(key)!r} now")
        elif exists and not self.overwrite:
            raise ConfigError(f"run folder {self.out!r} already exists; pass --resume to continue it "
                              "or --overwrite to replace it")

    def _clear_run_folder(self) -> None:
        for name in RUN_FILES:
            if os.path.isfile(self._path(name)):
                os.remove(self._path(name))
        tdir = self._path("teacher")
        if os.path.isfile(os.path.join(tdir, "config.yaml")):
            shutil.rmtree(tdir)

    def _teacher_arch(self) -> str:
        return self.cfg["teacher"]["arch"] or self.cfg["model"]["arch"]

    def _needs_teacher(self) -> bool:
        return self.cfg["method"]["name"] == "kd" or self.cfg["model"]["init"] == "teacher"

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

    def _check_layers(self) -> None:
        """Consistency's module names exist in the model (checked before anything is written)."""
        names = self.cfg["method"]["layers"]
        if self.cfg["method"]["name"] != "consistency":
            return
        arch = self.cfg["model"]["arch"]
        with torch.device("meta"):  # names only: no memory, no initialisation
            modules = dict(build_model(arch, self.num_classes).named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            known = [n for n in modules if n][:12]
            raise ConfigError(f"method.layers: no module named {unknown[0]!r} in {arch} "
                              f"(some names it has: {known})")

    def _load_teacher(self, path: str, num_classes: int) -> nn.Module:
        arch = self._teacher_arch()
        with torch.device("meta"):  # no initialisation (and no use of torch's RNG): the file fills it
            teacher = build_model(arch, num_classes)
        ckpt.load_weights(teacher, path, "teacher", arch, CLASSIFIER[arch], num_classes, assign=True)
        return teacher

    def _amp_dtype(self) -> Optional[torch.dtype]:
        amp = self.cfg["amp"]
        if amp == "auto":
            return torch.bfloat16 if self.dist.device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]

    def _channels_last(self) -> bool:
        cl = self.cfg["model"]["channels_last"]
        if cl == "auto":
            return self.dist.device.type == "cuda" and self.cfg["model"]["arch"] in CONVNETS
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
        self._check_run_folder()
        data = build_data(cfg)
        want = cfg["data"]["num_classes"]
        if want is not None and want != data.num_classes:
            raise ConfigError(f"data.num_classes={want} but the data has {data.num_classes} classes")
        self._check_teacher_settings()
        self.num_classes = data.num_classes
        self._check_layers()
        teacher = None
        tw = cfg["teacher"]["weights"]
        if self._needs_teacher() and tw is not None:
            teacher = self._load_teacher(os.path.expanduser(str(tw)), self.num_classes)
        init = cfg["model"]["init"]
        if init not in (None, "teacher"):  # read and check it now, before anything is written
            arch = cfg["model"]["arch"]
            with torch.device("meta"):
                probe = build_model(arch, self.num_classes)
            ckpt.load_weights(probe, os.path.expanduser(init), "model.init", arch, CLASSIFIER[arch],
                              self.num_classes, assign=True)
            del probe

        # everything is checked: from here on files are written
        if self.dist.is_main:
            if self.overwrite and not self.resume:
                self._clear_run_folder()
            os.makedirs(self.out, exist_ok=True)
            if not self.resume:
                dump_config(cfg, self._path("config.yaml"))
        distributed.barrier(self.dist)

        if self._needs_teacher() and teacher is None:  # train a clean teacher first
            teacher = self._train_teacher()

        torch.manual_seed(cfg["seed"])
        rng.manual_seed(cfg["seed"])
        arch = cfg["model"]["arch"]
        model = build_model(arch, self.num_classes)
        if init == "teacher":
            model.load_state_dict(teacher.state_dict())
        elif init is not None:
            ckpt.load_weights(model, os.path.expanduser(init), "model.init", arch, CLASSIFIER[arch],
                              self.num_classes)
        n = cfg["noise"]
        self.spec = NoiseSpec(eta=n["eta"], scale=n["scale"], noise_bias=n["noise_bias"])
        convert(model, self.spec, exclude=n["exclude"] or None)
        dev = self.dist.device
        fmt = torch.channels_last if self._channels_last() else torch.contiguous_format
        model.to(dev, memory_format=fmt)
        self.base = model
        self.model = model
        if self.dist.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None)

        m = cfg["method"]
        ls = m["label_smoothing"]
        if m["name"] in ("clean", "noise"):
            self.task = ClassificationTask(self.model, noisy=m["name"] == "noise", label_smoothing=ls)
        elif m["name"] == "kd":
            teacher = FrozenTeacher(teacher.to(dev, memory_format=fmt))
            self.task = DistillationTask(self.model, teacher, m["temperature"], m["alpha"], ls)
        else:
            try:
                self.task = ConsistencyTask(self.model, m["layers"], m["lambda"], m["distance"], ls,
                                            base=self.base)
            except ValueError as e:
                raise ConfigError(str(e)) from e

        d = cfg["data"]
        self.sampler = EpochBatchSampler(len(data.train), d["batch_size"], cfg["seed"], self.dist.rank,
                                         self.dist.world_size)
        pin = dev.type == "cuda"
        self.train_loader = train_loader(data.train, self.sampler, d["workers"], pin)
        self.val_loader = eval_loader(data.val, d["eval_batch_size"], d["workers"], pin, self.dist.rank,
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
        self.best = -1.0
        self.sums: dict = {}
        self.metrics: list = []
        if self.resume and os.path.isfile(self._path("last.pt")):
            self._load_checkpoint()
        if self.dist.is_main:
            self._truncate_logs()

    def _train_teacher(self) -> nn.Module:
        tdir = self._path("teacher")
        tcfg = teacher_config(self.cfg)
        weights = os.path.join(tdir, "model.pth")
        if not os.path.isfile(weights):
            self.log(f"training a clean teacher ({tcfg['model']['arch']}, "
                     f"{tcfg['schedule']['epochs']} epochs) in {tdir}")
            resume = os.path.isfile(os.path.join(tdir, "last.pt"))
            Trainer(tcfg, tdir, resume=resume, overwrite=not resume, progress=self.progress,
                    device=self.dist.device, log=self._log).fit()
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
            "world_size": self.dist.world_size,
        }

    def _save(self, name: str = "last.pt") -> None:
        if self.dist.is_main:
            ckpt.save_atomic(self._state(), self._path(name))
        distributed.barrier(self.dist)

    def _load_checkpoint(self) -> None:
        state = ckpt.load_file(self._path("last.pt"), "checkpoint")
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(f"{self._path('last.pt')!r} is not a fastnoise checkpoint of version "
                              f"{CHECKPOINT_VERSION}")
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
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=dev) for k, v in state["sums"].items()}
        self.best = float(state["best"])
        if os.path.isfile(self._path("metrics.json")):
            with open(self._path("metrics.json")) as f:
                self.metrics = [r for r in json.load(f) if r["epoch"] <= self.epoch]
        self.log(f"resumed {self.out} at epoch {self.epoch}, step {self.global_step}")

    def _truncate_logs(self) -> None:
        """Drop log rows written after the checkpoint (a run killed between the two)."""
        for name, key, limit in (("steps.csv", "step", self.global_step),
                                 ("metrics.csv", "epoch", self.epoch)):
            path = self._path(name)
            if not os.path.isfile(path):
                continue
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            if not rows:
                continue
            col = rows[0].index(key)
            keep = [rows[0]] + [r for r in rows[1:] if int(r[col]) <= limit]
            if len(keep) != len(rows):
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(keep)

    # ------------------------------------------------------------------ logging
    def _append_csv(self, name: str, row: dict) -> None:
        path = self._path(name)
        new = not os.path.isfile(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def _add(self, key: str, value: torch.Tensor) -> None:
        v = value.detach().to(torch.float64)
        self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()

    # ------------------------------------------------------------------ evaluation
    def _eval_kwargs(self) -> dict:
        return {"device": self.dist.device, "autocast_dtype": self.amp_dtype,
                "channels_last": self._channels_last(), "distributed": self.dist.distributed,
                "progress": False}

    def _validate(self) -> dict:
        clean = evaluate_robustness(self.base, self.val_loader, [0.0], 1, **self._eval_kwargs())
        out = {"val_top1": clean.mean[0]}
        draws = self.cfg["eval"]["epoch_draws"]
        eta = self.spec.eta
        if draws > 0 and eta > 0:
            r = evaluate_robustness(self.base, self.val_loader, [eta], draws, **self._eval_kwargs())
            out["val_top1_noisy"] = r.mean[0]
        return out

    def evaluate(self, etas=None, draws=None) -> RobustnessResult:
        """The robustness table of the current model on the validation set."""
        e = self.cfg["eval"]
        kw = self._eval_kwargs()
        kw["progress"] = self.progress and self.dist.is_main
        return evaluate_robustness(self.base, self.val_loader, e["etas"] if etas is None else etas,
                                   e["draws"] if draws is None else draws, name=self.cfg["name"], **kw)

    # ------------------------------------------------------------------ training
    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        dev = self.dist.device
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        if self._channels_last() and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast(dev.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            out = self.task(x, y)
        loss = out["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        n = torch.tensor(float(y.numel()), dtype=torch.float64, device=dev)
        self._add("loss", loss * n)
        for k in ("ce", "kd", "consistency"):
            if k in out:
                self._add(k, out[k] * n)
        self._add("correct", (out["output"].argmax(-1) == y).sum())
        self._add("samples", n)
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
        row["train_top1"] = 100.0 * totals.get("correct", 0.0) / n
        row.update(self._validate())
        row["seconds"] = round(seconds, 3)
        return row

    def fit(self) -> TrainResult:
        self._setup()
        cfg = self.cfg
        spe = self.sampler.steps_per_epoch
        epochs = cfg["schedule"]["epochs"]
        every, ck_every = cfg["log"]["every"], cfg["checkpoint"]["every_steps"]
        self.log(f"{cfg['name']}: {cfg['method']['name']} on {cfg['data']['dataset']} "
                 f"({self.num_classes} classes), {cfg['model']['arch']}, noise {self.spec}, "
                 f"{epochs} epochs x {spe} steps, global batch {cfg['data']['batch_size']}, "
                 f"{self.dist.world_size} process(es) on {self.dist.device}")
        bar_cm = contextlib.nullcontext(None)
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar_cm = tqdm(total=self.total_steps, initial=self.global_step, desc=cfg["name"],
                          dynamic_ncols=True, leave=False)
        with bar_cm as bar:
            self._bar = bar
            while self.epoch < epochs:
                t0 = time.perf_counter()
                self.base.train()
                self.task.train()
                self.sampler.set_epoch(self.epoch, self.step_in_epoch)
                for x, y in self.train_loader:
                    out = self._step(x, y)
                    self.step_in_epoch += 1
                    self.global_step += 1
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
                            raise FloatingPointError(f"loss is {loss} at step {self.global_step}")
                    if bar is not None:
                        bar.update(1)
                    if self.stop_at_step is not None and self.global_step >= self.stop_at_step:
                        self._bar = None
                        self._save()
                        self.task.close()  # hooks off the model
                        self.log(f"stopped at step {self.global_step}; continue with --resume")
                        return TrainResult(self.out, self.global_step, self.epoch, True, self.metrics)
                    if ck_every and self.global_step % ck_every == 0 and self.step_in_epoch < spe:
                        self._save()
                row = self._epoch_row(time.perf_counter() - t0)
                self.epoch += 1
                self.step_in_epoch = 0
                self.sums = {}
                score = row.get("val_top1_noisy", row["val_top1"])
                improved = score > self.best
                self.best = max(self.best, score)
                self.metrics.append(row)
                if self.dist.is_main:
                    self._append_csv("metrics.csv", row)
                    with open(self._path("metrics.json"), "w") as f:
                        json.dump(self.metrics, f, indent=1)
                    noisy = f", noisy val {row['val_top1_noisy']:.2f}%" if "val_top1_noisy" in row else ""
                    self.log(f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}, "
                             f"val {row['val_top1']:.2f}%{noisy}")
                self._save()
                if improved and cfg["checkpoint"]["best"]:
                    self._save("best.pt")
            self._bar = None
        self.task.close()  # hooks off the model (consistency), before the final evaluation
        if self.dist.is_main:
            ckpt.save_atomic(self.base.state_dict(), self._path("model.pth"))
        result = None
        if cfg["eval"]["etas"]:
            result = self.evaluate()
            if self.dist.is_main:
                result.to_csv(self._path("robustness.csv"))
                result.plot(self._path("robustness.png"), title=f"{cfg['name']} ({cfg['method']['name']})")
                self.log(result.table())
        distributed.barrier(self.dist)
        return TrainResult(self.out, self.global_step, self.epoch, False, self.metrics, result)


def train(config: dict, out_dir: str, **kwargs) -> TrainResult:
    """``Trainer(config, out_dir, **kwargs).fit()``."""
    return Trainer(config, out_dir, **kwargs).fit()
