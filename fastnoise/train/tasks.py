"""Training tasks: one forward of a method, returning ``{"loss", "output", ...}`` (timm ``task/`` style).

- :class:`ClassificationTask`: cross-entropy on the model's output, with the layers' noise
  (``noise``, the noise-injection baseline) or without it (``clean``).
- :class:`DistillationTask`: Noisy Machines' KD + noise: a clean frozen teacher
  (:class:`FrozenTeacher`, never converted to noisy layers) and a noisy student.
- :class:`ConsistencyTask`: Hou et al.'s CE on the noisy forward plus ``lambda`` times the
  distance between intermediate features of the noisy forward and of a clean forward of the
  same weights, captured by forward hooks on modules named in the configuration.

Each task takes ``(x, y)`` and returns a dict with ``loss`` (float32 scalar to backpropagate),
``output`` (the trained model's logits) and the loss terms (detached) for logging.

The models a task is given stay the user's: the teacher's ``requires_grad`` flags and train/eval
modes are left as they were (it runs in eval mode under ``torch.inference_mode`` only for the
duration of each call), and the hooks of :class:`ConsistencyTask` come off with ``close()`` or
at the end of a ``with`` block::

    with ConsistencyTask(model, ["layer1", "layer2"]) as task:
        ...  # train
    assert not model.layer1._forward_hooks
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..context import noise
from .losses import (
    DEFAULT_ALPHA,
    DEFAULT_DISTANCE,
    DEFAULT_LAMBDA,
    DEFAULT_TEMPERATURE,
    consistency_loss,
    kd_terms,
)

__all__ = ["FrozenTeacher", "FeatureCapture", "Task", "ClassificationTask", "DistillationTask",
           "ConsistencyTask", "keep_norm_stats", "eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` and every submodule in eval mode inside the block; each one's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class FrozenTeacher(nn.Module):
    """Runs a model in eval mode under ``torch.inference_mode``: no gradients, no state changes.

    The model is not changed: neither its parameters' ``requires_grad`` nor its modules' modes
    (each call switches it to eval mode and puts every submodule's mode back after, see
    :func:`eval_mode`), so the user's model trains as before once it is out of the task (a
    student made by ``copy.deepcopy(teacher)`` trains). ``train()`` does not reach the model.
    Inference mode, not ``requires_grad``, is what keeps gradients out: nothing the teacher
    computes is recorded. Its logits are cloned on the way out: a tensor made in inference mode
    cannot be saved for backward, and the clone (of ``[batch, classes]``, cheap) is an
    ordinary tensor whatever the loss does with it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.training = False

    def train(self, mode: bool = True):
        self.training = False  # only this wrapper's flag: the model's modes are its owner's
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), eval_mode(self.model):
            out = self.model(x)
        return out.clone()


class FeatureCapture:
    """Forward hooks that keep the outputs of the named submodules of ``model`` while recording.

    ``with capture.recording() as feats: model(x)`` fills ``feats`` (a list, in the order of
    ``names``). Outside a recording the hooks do nothing. ``first_tensor=True`` keeps the first
    item of a module that returns a tuple (a transformer block's hidden states).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], first_tensor: bool = False):
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            known = [n for n in modules if n][:12]
            raise ValueError(f"method.layers: no module named {unknown[0]!r} in the model "
                             f"(some names it has: {known})")
        self.names = list(names)
        self.first_tensor = first_tensor
        self._store: Optional[dict] = None
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._store is None:
                return
            if (self.first_tensor and isinstance(output, (tuple, list)) and output
                    and isinstance(output[0], torch.Tensor)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"method.layers: {name!r} returns {type(output).__name__}, not a tensor")
            self._store[name] = output
        return hook

    @contextlib.contextmanager
    def recording(self):
        feats: list = []
        self._store = {}
        try:
            yield feats
            missing = [n for n in self.names if n not in self._store]
            if missing:
                raise RuntimeError(f"method.layers: {missing[0]!r} was not called during the forward")
            feats.extend(self._store[n] for n in self.names)
        finally:
            self._store = None

    def remove(self) -> None:
        """Take the hooks off the model (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        return bool(self._handles)


@contextlib.contextmanager
def keep_norm_stats(model: nn.Module):
    """Restore every norm layer's running statistics on exit: an extra (clean) forward in train
    mode then normalises with its batch's statistics but leaves no trace in the model."""
    saved = [(b, b.clone()) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase)
             for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


def _ce(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


class Task(nn.Module):
    """Base of the tasks: ``close()`` releases what the task put on the models (hooks), and a
    ``with`` block closes it at the end. Closing twice is harmless."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ClassificationTask(Task):
    """Cross-entropy; ``noisy=False`` turns the layers' noise off (clean training)."""

    def __init__(self, model: nn.Module, noisy: bool = True, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.noisy, self.label_smoothing = model, noisy, label_smoothing

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        with contextlib.nullcontext() if self.noisy else noise(enabled=False):
            out = self.model(x)
        loss = _ce(out, y, self.label_smoothing)
        return {"loss": loss, "output": out, "ce": loss.detach()}


class DistillationTask(Task):
    """``(1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))``, ``s`` noisy.

    ``teacher`` is wrapped in a :class:`FrozenTeacher` (unless it is one), which leaves the
    user's module as it is.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, temperature: float = DEFAULT_TEMPERATURE,
                 alpha: float = DEFAULT_ALPHA, label_smoothing: float = 0.0):
        super().__init__()
        self.model = model
        self.teacher = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        self.temperature, self.alpha, self.label_smoothing = temperature, alpha, label_smoothing

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        t = self.teacher(x)
        s = self.model(x)
        ce, kd = kd_terms(s, t, y, self.temperature, self.label_smoothing)
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        return {"loss": loss, "output": s, "teacher_output": t, "ce": ce.detach(), "kd": kd.detach()}


class ConsistencyTask(Task):
    """``CE(noisy logits, y) + lambda * consistency_loss(noisy feats, clean feats)``.

    Its forward hooks sit on ``base``'s modules from construction until :meth:`close` (or the
    end of a ``with`` block); a closed task refuses to run.

    Args:
        model: the noisy model as called for training (possibly wrapped by DDP).
        layers: names (in ``base``) of the modules whose outputs are compared.
        base: the unwrapped model (default ``model``): hooks sit on its modules and the clean
            pass calls it directly, outside DDP.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], lam: float = DEFAULT_LAMBDA,
                 distance: str = DEFAULT_DISTANCE,
                 label_smoothing: float = 0.0, base: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.base = model if base is None else base
        self.capture = FeatureCapture(self.base, layers)
        self.lam, self.distance, self.label_smoothing = lam, distance, label_smoothing

    def close(self) -> None:
        """Remove the forward hooks from the model."""
        self.capture.remove()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        if not self.capture.active:
            raise RuntimeError("this ConsistencyTask is closed (its hooks were removed); make a new one")
        # The clean pass: same weights, noise off, no autograd. no_grad rather than
        # inference_mode: the clean features are the MSE's target, and mse_loss saves its
        # target for backward, which an inference-mode tensor cannot be.
        with torch.no_grad(), noise(enabled=False), keep_norm_stats(self.base), \
                self.capture.recording() as clean:
            self.base(x)
        with self.capture.recording() as noisy:
            out = self.model(x)
        ce = _ce(out, y, self.label_smoothing)
        cons = consistency_loss(noisy, clean, self.distance)
        loss = ce + self.lam * cons
        return {"loss": loss, "output": out, "ce": ce.detach(), "consistency": cons.detach()}
