"""Task kinds: what the one training loop asks about its task (classifier or causal LM).

A kind says how a given model and data are checked, which task a method makes, how a batch goes
to the device and into the task, what the epoch's row holds, how validation runs and which epoch
is best. :class:`ClassifierKind` is the classifiers' (``(input, label)`` data, top-1);
:class:`~fastnoise.train.lm.CausalLMKind` the causal LMs' (token ids, perplexity). The Trainer
(:mod:`fastnoise.train.trainer`) holds one in ``trainer.kind``, chosen by the ``task`` setting.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..robustness import TargetError, evaluate_robustness, first_bad_target
from . import runfolder as rf
from .errors import ConfigError
from .models import build_model
from .tasks import (
    ClassificationTask,
    ConsistencyTask,
    DistillationTask,
    FeatureCapture,
    FrozenTeacher,
    Task,
    eval_mode,
)

__all__ = ["ClassifierKind", "kind_for", "first_sample", "check_model_fits"]


def _known_labels(data):
    """Every label of a dataset without reading its inputs, where it keeps them apart (a
    TensorDataset's second tensor, ``.targets`` without a ``target_transform``, a Subset of
    either); None otherwise (then each batch's labels are checked as training reads them)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return None  # its sampler and collate decide what a batch holds
    if isinstance(data, torch.utils.data.Subset):
        inner = _known_labels(data.dataset)
        return None if inner is None else inner[torch.as_tensor(data.indices, dtype=torch.int64)]
    if isinstance(data, torch.utils.data.TensorDataset):
        return data.tensors[1] if len(data.tensors) == 2 else None
    targets = getattr(data, "targets", None)
    if targets is None or getattr(data, "target_transform", None) is not None:
        return None
    try:
        t = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):
        return None
    return t if t.dim() >= 1 and len(t) == len(data) else None


def _check_all_labels(data, classes: int, what: str) -> None:
    """Each label of ``data`` (where :func:`_known_labels` has them) is an integer in
    ``[0, classes)``, one per sample; the error names the first bad index."""
    y = _known_labels(data) if data is not None else None
    if y is None or not len(y):
        return
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        raise ConfigError(f"{what}'s labels are {str(y.dtype).replace('torch.', '')} (e.g. {what}[0]'s is "
                          f"{y[0].tolist()!r}): labels must be integer class indices")
    if y.dim() != 1:
        raise ConfigError(f"{what}'s labels have shape {list(y.shape)}: one integer class index per "
                          "sample is needed, shape [n]" + (" (squeeze the [n, 1] column)" if y.dim() == 2
                                                           and y.shape[1] == 1 else ""))
    j = first_bad_target(y, classes)
    if j is not None:
        hint = " (1-based labels?)" if int(y[j]) == classes else ""
        raise ConfigError(f"{what}[{j}]'s label is {int(y[j])}: labels must be integers in [0, {classes}) "
                          f"(the model has {classes} outputs){hint}")


def first_sample(data):
    """``data[0]`` of a map-style dataset (or a DataLoader's), without iterating a loader."""
    inner = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
    try:
        if len(inner) == 0:
            return None
        return inner[0]
    except (TypeError, NotImplementedError, KeyError, IndexError):
        return None


def check_model_fits(arch: str, num_classes: int, sample: torch.Tensor, layers=(), what: str = "model.arch",
                     data: str = "the data") -> None:
    """Run a batch of ``sample``'s shape through ``arch`` built on the meta device (no memory, no
    computation) and capture ``layers`` as consistency would: an architecture that does not fit
    the data is a :class:`ConfigError` before anything is written, not a traceback at step 1."""
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    model.eval()
    x = torch.empty((2, *sample.shape), dtype=sample.dtype, device="meta")
    capture = FeatureCapture(model, layers) if layers else None
    try:
        with torch.no_grad(), capture.recording() if capture is not None else contextlib.nullcontext():
            out = model(x)
    except NotImplementedError:  # an op without a meta kernel: nothing can be said here
        return
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ConfigError(f"{what}={arch} does not fit {data} (inputs of shape {list(sample.shape)}): "
                          f"{rf.first_line(e)}") from None
    finally:
        if capture is not None:
            capture.remove()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what}={arch} gives outputs of shape {got} for {data}, "
                          f"not [batch, {num_classes}]")


class ClassifierKind:
    """Classifiers: ``(input tensor, integer label)`` samples, cross-entropy, top-1."""

    name = "classification"
    initial_best = -1.0
    classes = "classes"  # what data.num_classes counts

    def check_built(self, cfg: dict, data, layers=(), teacher_arch: Optional[str] = None) -> None:
        """A recipe's model (and a teacher of another ``teacher_arch``) take its data: a batch of
        the first validation sample's shape through each, built on the meta device (``layers``
        captured as consistency would)."""
        if len(data.val) == 0:
            raise ConfigError(f"the {cfg['data']['dataset']} data has no validation samples")
        sample = data.val[0][0]
        what = f"the {cfg['data']['dataset']} data"
        check_model_fits(cfg["model"]["arch"], data.num_classes, sample, layers, data=what)
        if teacher_arch is not None:
            check_model_fits(teacher_arch, data.num_classes, sample, what="teacher.arch", data=what)

    def check_given(self, trainer) -> tuple:
        """One batch of two validation samples through the model (and teacher) in eval mode,
        without autograd: ``(classes, the model's name, whether it has convolutions)``."""
        g, cfg = trainer.given, trainer.cfg
        names = cfg["method"]["layers"] if cfg["method"]["name"] == "consistency" else []
        for what, data in (("train_data", g.train), ("val_data", g.val)):
            first = first_sample(data) if data is not None else None
            if first is not None and not (isinstance(first, (tuple, list)) and len(first) == 2
                                          and isinstance(first[0], torch.Tensor)):
                got = f"a {len(first)}-item {type(first).__name__}" if isinstance(first, (tuple, list)) else \
                    f"a {type(first).__name__}"
                raise ConfigError(f"{what}[0] is {got}, not an (input tensor, label) pair (token ids for "
                                  "a causal LM: task='causal_lm')")
        sample = first_sample(g.val) if g.val is not None else None
        where = "val_data[0]"
        if sample is None:
            sample, where = first_sample(g.train), "train_data[0]"
        convnet = any(isinstance(m, nn.Conv2d) for m in g.model.modules())
        if sample is None:  # nothing to look at without drawing from a loader: the first step tells
            return None, type(g.model).__name__, convnet
        if (not isinstance(sample, (tuple, list)) or len(sample) != 2
                or not isinstance(sample[0], torch.Tensor)):
            raise ConfigError(f"{where} is {type(sample).__name__}, not an (input tensor, label) pair "
                              "(token ids for a causal LM: task='causal_lm')")
        classes = None
        for what, m in (("model", g.model), ("teacher", g.teacher)):
            if m is None:
                continue
            p = next(iter(m.parameters()), None)
            x = torch.stack([sample[0], sample[0]]).to(p.device if p is not None else "cpu")
            capture = FeatureCapture(m, names) if names and what == "model" else None
            try:
                with torch.no_grad(), eval_mode(m), (capture.recording() if capture is not None
                                                     else contextlib.nullcontext()):
                    out = m(x)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                raise ConfigError(f"the {what} does not take {where}'s input (of shape "
                                  f"{list(sample[0].shape)}): {rf.first_line(e)}") from None
            finally:
                if capture is not None:
                    capture.remove()
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < 2:
                got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ConfigError(f"the {what} gives outputs of shape {got} for a batch of 2 inputs, "
                                  "not [batch, classes]")
            if classes is not None and out.shape[1] != classes:
                raise ConfigError(f"the teacher has {out.shape[1]} outputs, the model {classes}")
            classes = int(out.shape[1])
        label = sample[1]
        if isinstance(label, torch.Tensor):  # a 0-d integer tensor is an int label; 1.0, True, [3] are not
            label = (int(label) if label.dim() == 0 and not (label.dtype == torch.bool
                                                              or label.dtype.is_floating_point
                                                              or label.dtype.is_complex) else label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < classes:
            raise ConfigError(f"{where}'s label is {sample[1]!r}: labels must be integers in [0, {classes}) "
                              f"(the model has {classes} outputs)")
        for what, data in (("train_data", g.train), ("val_data", g.val)):
            _check_all_labels(data, classes, what)
        return classes, type(g.model).__name__, convnet

    def make_task(self, trainer, teacher, fmt) -> Task:
        m = trainer.cfg["method"]
        ls = m["label_smoothing"]
        if m["name"] in ("clean", "noise"):
            return ClassificationTask(trainer.model, noisy=m["name"] == "noise", label_smoothing=ls)
        if m["name"] == "kd":
            teacher = FrozenTeacher(teacher.to(trainer.dist.device, memory_format=fmt))
            return DistillationTask(trainer.model, teacher, m["temperature"], m["alpha"], ls)
        try:
            return ConsistencyTask(trainer.model, m["layers"], m["lambda"], m["distance"], ls,
                                   base=trainer.base)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def check_batch(self, trainer, batch) -> None:
        """This step's labels, before the forward (see ``Trainer._check_batch_labels``)."""
        trainer._check_batch_labels(batch[1])

    def inputs(self, batch, dev, channels_last: bool) -> tuple:
        x, y = batch
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def sums(self, out: dict, inputs: tuple) -> dict:
        y = inputs[1]
        n = torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)
        s = {"loss": out["loss"].detach() * n, "correct": (out["output"].argmax(-1) == y).sum(), "samples": n}
        s.update({k: out[k] * n for k in ("ce", "kd", "consistency") if k in out})
        return s

    def train_row(self, totals: dict, n: float) -> dict:
        return {"train_top1": 100.0 * totals.get("correct", 0.0) / n}

    def robustness_kwargs(self) -> dict:
        return {}

    def validate(self, trainer) -> dict:
        if trainer.val_loader is None:
            return {}
        try:
            clean = evaluate_robustness(trainer.base, trainer.val_loader, [0.0], 1, **trainer._eval_kwargs())
            out = {"val_top1": clean.mean[0]}
            draws, eta = trainer.cfg["eval"]["epoch_draws"], trainer.spec.eta
            if draws > 0 and eta > 0:
                r = evaluate_robustness(trainer.base, trainer.val_loader, [eta], draws,
                                        **trainer._eval_kwargs())
                out["val_top1_noisy"] = r.mean[0]
        except TargetError as e:
            raise ConfigError(f"the validation data: {e}") from None
        return out

    def score(self, row: dict) -> Optional[float]:
        return row.get("val_top1_noisy", row.get("val_top1"))

    def epoch_message(self, row: dict) -> str:
        noisy = f", noisy val {row['val_top1_noisy']:.2f}%" if "val_top1_noisy" in row else ""
        val = f", val {row['val_top1']:.2f}%" if "val_top1" in row else ""
        return f"loss {row['train_loss']:.4f}{val}{noisy}"


def kind_for(task: str):
    """The kind of the ``task`` setting."""
    if task == "causal_lm":
        from .lm import CausalLMKind

        return CausalLMKind()
    return ClassifierKind()
