"""Causal language models on the one training engine: the tasks and the task kind the Trainer calls.

Batches are those of :mod:`fastnoise.lm` (token ids ``[B, T]``, or dicts with ``input_ids`` and
optionally ``attention_mask`` / ``labels``). The tasks take a batch (a dict) and return
``{"loss", "output", ...}`` as the classifier tasks do, with the sums the engine logs:

- :class:`CausalLMTask`: the mean next-token cross-entropy over the counted tokens, with the
  layers' noise (``noise``) or without (``clean``);
- :class:`LMDistillationTask`: ``(1 - alpha) * CE + alpha * T^2 * KL(softmax(t/T) ||
  softmax(s/T))`` per position, averaged over the counted places (padding and the last place
  masked), from a frozen clean teacher (:class:`FrozenLMTeacher`); ``top_k`` keeps only the
  teacher's k largest logits and their tokens (:func:`~fastnoise.train.losses.token_kd_loss`);
- :class:`LMConsistencyTask`: CE on the noisy forward plus ``lambda`` times the distance between
  the hidden states of the named modules (decoder blocks: ``"model.layers.0"``) of the noisy and a
  clean forward of the same weights, per token (cosine by default), padding masked.

:class:`CausalLMKind` is what the Trainer asks about a causal-LM run (how a batch goes to the
device, what the epoch's row holds: perplexity and next-token accuracy, which epoch is best);
:func:`check_given` checks the model, teacher and data before anything is written.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .. import lm
from ..context import noise
from ..robustness import evaluate_robustness
from . import runfolder as rf
from .errors import ConfigError
from .losses import (
    DEFAULT_ALPHA,
    DEFAULT_DISTANCE,
    DEFAULT_LAMBDA,
    DEFAULT_TEMPERATURE,
    teacher_top_k,
    token_feature_distance,
)
from .losses import token_kd_loss as _token_kd
from .tasks import FeatureCapture, Task, eval_mode, keep_norm_stats

__all__ = ["FrozenLMTeacher", "CausalLMTask", "LMDistillationTask", "LMConsistencyTask", "CausalLMKind",
           "check_given", "check_token_data", "infer_task"]


def _ce(logits: torch.Tensor, batch: dict) -> tuple:
    nll, tokens, correct = lm.token_stats(logits, lm.shifted_targets(batch))
    return nll / tokens.clamp_min(1.0).to(nll.dtype), nll.detach(), tokens, correct


def _result(loss, logits, ce, nll, tokens, correct, **terms) -> dict:
    out = {"loss": loss, "output": logits, "ce": ce.detach(), "nll": nll, "tokens": tokens,
           "correct": correct}
    out.update({k: v.detach() for k, v in terms.items()})
    return out


class FrozenLMTeacher(nn.Module):
    """A clean causal LM in eval mode under ``torch.inference_mode`` (as
    :class:`~fastnoise.train.tasks.FrozenTeacher`: the model's flags and modes are left as they
    are). Returns ``(logits, None)``, or with ``top_k`` the log-probabilities at ``temperature``
    of the k most likely tokens per place and their indices (``[B, T, k]`` each, see
    :func:`~fastnoise.train.losses.teacher_top_k`: the full logits are dropped inside the call)."""

    def __init__(self, model: nn.Module, top_k: Optional[int] = None,
                 temperature: float = DEFAULT_TEMPERATURE):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(model).__name__}")
        self.model, self.top_k, self.temperature = model, top_k, temperature
        self.training = False
        self._options = lm.call_options(model)

    def train(self, mode: bool = True):
        self.training = False
        return self

    def forward(self, batch: dict) -> tuple:
        with torch.inference_mode(), eval_mode(self.model), noise(enabled=False):
            logits = lm.logits_of(self.model, batch, self._options)
            if self.top_k is None:
                return logits.clone(), None
            log_p, indices = teacher_top_k(logits, self.top_k, self.temperature)
        return log_p.clone(), indices.clone()


class CausalLMTask(Task):
    """Next-token cross-entropy; ``noisy=False`` turns the layers' noise off (clean training)."""

    def __init__(self, model: nn.Module, noisy: bool = True, base: Optional[nn.Module] = None):
        super().__init__()
        self.model, self.noisy = model, noisy
        self._options = lm.call_options(model if base is None else base)

    def forward(self, batch: dict) -> dict:
        with contextlib.nullcontext() if self.noisy else noise(enabled=False):
            logits = lm.logits_of(self.model, batch, self._options)
        ce, nll, tokens, correct = _ce(logits, batch)
        return _result(ce, logits, ce, nll, tokens, correct)


class LMDistillationTask(Task):
    """``(1 - alpha) * CE(s) + alpha * T^2 * KL(t || s)`` per next-token place, ``s`` noisy."""

    def __init__(self, model: nn.Module, teacher: nn.Module, temperature: float = DEFAULT_TEMPERATURE,
                 alpha: float = DEFAULT_ALPHA, top_k: Optional[int] = None, base: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.teacher = (teacher if isinstance(teacher, FrozenLMTeacher)
                        else FrozenLMTeacher(teacher, top_k, temperature))
        self.temperature, self.alpha = temperature, alpha
        self._options = lm.call_options(model if base is None else base)

    def forward(self, batch: dict) -> dict:
        t, t_idx = self.teacher(batch)
        s = lm.logits_of(self.model, batch, self._options)
        ce, nll, tokens, correct = _ce(s, batch)
        mask = lm.shifted_targets(batch) != lm.IGNORE_INDEX
        kd = _token_kd(s[:, :-1], t[:, :-1], mask, self.temperature,
                       None if t_idx is None else t_idx[:, :-1])
        loss = (1.0 - self.alpha) * ce + self.alpha * kd
        return _result(loss, s, ce, nll, tokens, correct, kd=kd)


class LMConsistencyTask(Task):
    """``CE(noisy) + lambda * mean over layers of the per-token distance of hidden states``.

    ``layers`` are module names in ``base`` (a decoder block's output: its first item when it
    returns a tuple); its hooks stay on ``base`` until :meth:`close`."""

    def __init__(self, model: nn.Module, layers: Sequence[str], lam: float = DEFAULT_LAMBDA,
                 distance: str = DEFAULT_DISTANCE, base: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.base = model if base is None else base
        self.capture = FeatureCapture(self.base, layers, first_tensor=True)
        self.lam, self.distance = lam, distance
        self._options = lm.call_options(self.base)

    def close(self) -> None:
        self.capture.remove()

    def forward(self, batch: dict) -> dict:
        if not self.capture.active:
            raise RuntimeError("this LMConsistencyTask is closed (its hooks were removed); make a new one")
        with torch.no_grad(), noise(enabled=False), keep_norm_stats(self.base), \
                self.capture.recording() as clean:
            lm.logits_of(self.base, batch, self._options)
        with self.capture.recording() as noisy:
            logits = lm.logits_of(self.model, batch, self._options)
        ce, nll, tokens, correct = _ce(logits, batch)
        mask = batch.get("attention_mask")
        mask = None if mask is None else mask != 0
        terms = []
        for name, n, c in zip(self.capture.names, noisy, clean, strict=True):
            if n.dim() != 3 or (mask is not None and n.shape[:2] != mask.shape):
                raise ValueError(f"method.layers: {name!r} gives {list(n.shape)}, not hidden states "
                                 "[batch, T, hidden]")
            terms.append(token_feature_distance(n, c, mask, self.distance))
        cons = torch.stack(terms).mean()
        loss = ce + self.lam * cons
        return _result(loss, logits, ce, nll, tokens, correct, consistency=cons)


# ----------------------------------------------------------------------------- checks
def _items(data):
    inner = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
    try:
        n = len(inner)
    except TypeError:
        return None
    return inner, n


def infer_task(data) -> Optional[str]:
    """``"causal_lm"`` when the first item of ``data`` (a dataset or a loader's dataset) is token
    ids, ``"classification"`` when it is something else, None when nothing can be read."""
    got = _items(data)
    if got is None or got[1] == 0:
        return None
    try:
        first = got[0][0]
    except (TypeError, NotImplementedError, KeyError, IndexError):
        return None
    return "causal_lm" if lm.is_token_sample(first) else "classification"


def check_token_data(data, where: str) -> tuple[int, int]:
    """Every item of ``data`` is token ids (see :mod:`fastnoise.lm`) of one shape and one set of
    keys; returns ``(sequence length, largest token id)``. Raises :class:`ConfigError` naming
    the first item that differs."""
    got = _items(data)
    if got is None:
        return 0, -1
    inner, n = got
    length, keys, top = None, None, -1
    for i in range(n):
        item = inner[i]
        name = f"{where}[{i}]"
        if not lm.is_token_sample(item):
            raise ConfigError(f"{name} is {type(item).__name__}, not token ids: the causal-LM task takes a "
                              "LongTensor [T] or a dict with 'input_ids' (and optional 'attention_mask', "
                              "'labels')")
        fields = {"input_ids": item} if isinstance(item, torch.Tensor) else {
            k: item[k] for k in ("input_ids", "attention_mask", "labels") if item.get(k) is not None}
        for k, v in fields.items():
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or not lm._integer(v):
                got_ = (f"{v.dtype} of shape {list(v.shape)}" if isinstance(v, torch.Tensor)
                        else type(v).__name__)
                raise ConfigError(f"{name}[{k!r}] is {got_}, not an integer tensor [T]")
        ids = fields["input_ids"]
        shapes = {k: tuple(v.shape) for k, v in fields.items()}
        if len(set(shapes.values())) > 1:
            raise ConfigError(f"{name} has fields of other lengths: {shapes}")
        if length is None:
            length, keys = ids.shape[0], set(fields)
        elif ids.shape[0] != length or set(fields) != keys:
            raise ConfigError(f"items of mixed shapes: {name} has {sorted(fields)} of length {ids.shape[0]}, "
                              f"{where}[0] {sorted(keys)} of length {length}; pad or cut the sequences to "
                              "one length (with an attention_mask of 0 on the padding)")
        if ids.numel():
            if int(ids.min()) < 0:
                raise ConfigError(f"{name} has the token id {int(ids.min())}: ids must be >= 0")
            top = max(top, int(ids.max()))
    if length is not None and length < 2:
        raise ConfigError(f"{where} holds sequences of {length} token(s): a causal LM needs at least 2 "
                          "(a token and the next one to predict)")
    return (length or 0), top


def _probe(model: nn.Module, sample, what: str, where: str) -> int:
    """One batch of two of ``sample`` through ``model`` (eval mode, no autograd, noise off):
    the vocabulary size of its logits."""
    batch = lm.as_batch(torch.utils.data.default_collate([sample, sample]))
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    if dev.type == "meta":
        v = lm.vocab_size_of(model)
        return -1 if v is None else v
    batch = {k: v.to(dev) for k, v in batch.items()}
    try:
        with torch.no_grad(), eval_mode(model), noise(enabled=False):
            logits = lm.logits_of(model, batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ConfigError(f"the {what} does not take {where}'s token ids (of length "
                          f"{batch['input_ids'].shape[1]}): {rf.first_line(e)}") from None
    want = tuple(batch["input_ids"].shape)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != want:
        raise ConfigError(f"the {what} gives logits of shape {list(logits.shape)} for token ids of shape "
                          f"{list(want)}, not [batch, T, vocab]")
    return int(logits.shape[-1])


def check_given(model: nn.Module, teacher: Optional[nn.Module], train, val) -> str:
    """The causal-LM run's model, teacher and data fit each other; the model's name. Raises
    :class:`ConfigError`: data that are not token ids or of mixed shapes, a sequence longer than
    the model's positions, a token id past its vocabulary, a teacher of another vocabulary size,
    logits not ``[B, T, V]``."""
    lengths, top, first, where = set(), -1, None, None
    for name, data in (("train_data", train), ("val_data", val)):
        if data is None:
            continue
        length, t = check_token_data(data, name)
        if length:
            lengths.add(length)
            top = max(top, t)
            if first is None:
                first, where = _items(data)[0][0], f"{name}[0]"
    if first is None:
        return type(model).__name__  # a loader without a length: the first step tells
    longest = max(lengths)
    vocab = None
    for what, m in (("model", model), ("teacher", teacher)):
        if m is None:
            continue
        limit = lm.max_positions_of(m)
        if limit is not None and longest > limit:
            raise ConfigError(f"the data hold sequences of {longest} tokens, longer than the {what}'s "
                              f"{limit} positions (its config's max_position_embeddings)")
        v = _probe(m, first, what, where)
        if v < 0:
            continue
        if vocab is not None and v != vocab:
            raise ConfigError(f"the teacher has a vocabulary of {v} tokens, the model {vocab}: token-level "
                              "distillation needs the same vocabulary")
        vocab = v
    if vocab is not None and top >= vocab:
        raise ConfigError(f"the data hold the token id {top}, past the model's vocabulary of {vocab}")
    return type(model).__name__


# ----------------------------------------------------------------------------- the task kind
class CausalLMKind:
    """What the Trainer asks about a causal-LM run (the classifier's counterpart is
    :class:`~fastnoise.train.kinds.ClassifierKind`)."""

    name = "causal_lm"
    initial_best = -math.inf  # scores are minus perplexities
    classes = "tokens in the vocabulary"  # what data.num_classes counts

    def check_built(self, cfg: dict, data, layers=(), teacher_arch: Optional[str] = None) -> None:
        """A recipe's causal LM (and a teacher of another ``teacher_arch``) take its token data:
        :func:`check_given` on models built for real on the CPU (a model on the meta device has
        no rotary frequencies), torch's RNG state put back."""
        from .models import build_model

        if len(data.val) == 0:
            raise ConfigError(f"the {cfg['data']['dataset']} data has no validation sequences")
        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg["model"]["arch"], data.num_classes)
            teacher = None if teacher_arch is None else build_model(teacher_arch, data.num_classes)
        check_given(model, teacher, data.train, data.val)

    def check_given(self, trainer) -> tuple:
        g = trainer.given
        return None, check_given(g.model, g.teacher, g.train, g.val), False

    def make_task(self, trainer, teacher, fmt) -> Task:
        m = trainer.cfg["method"]
        if m["name"] in ("clean", "noise"):
            return CausalLMTask(trainer.model, noisy=m["name"] == "noise", base=trainer.base)
        if m["name"] == "kd":
            teacher = FrozenLMTeacher(teacher.to(trainer.dist.device), m["top_k"], m["temperature"])
            return LMDistillationTask(trainer.model, teacher, m["temperature"], m["alpha"],
                                      base=trainer.base)
        try:
            return LMConsistencyTask(trainer.model, m["layers"], m["lambda"], m["distance"],
                                     base=trainer.base)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def check_batch(self, trainer, batch) -> None:
        """Token batches are checked as they are made (:func:`fastnoise.lm.as_batch`)."""

    def inputs(self, batch, dev, channels_last: bool) -> tuple:
        return (lm.as_batch(batch, dev),)

    def sums(self, out: dict, inputs: tuple) -> dict:
        n = out["tokens"]
        s = {"loss": out["loss"].detach() * n, "nll": out["nll"], "tokens": n, "correct": out["correct"],
             "samples": n}
        s.update({k: out[k] * n for k in ("ce", "kd", "consistency") if k in out})
        return s

    def train_row(self, totals: dict, n: float) -> dict:
        return {"train_ppl": lm.perplexity(totals.get("nll", 0.0), totals.get("tokens", 0.0)),
                "train_acc": 100.0 * totals.get("correct", 0.0) / n}

    def robustness_kwargs(self) -> dict:
        return {"task": "causal_lm"}

    def validate(self, trainer) -> dict:
        if trainer.val_loader is None:
            return {}
        kw = {**trainer._eval_kwargs(), **self.robustness_kwargs()}
        clean = evaluate_robustness(trainer.base, trainer.val_loader, [0.0], 1, **kw)
        out = {"val_ppl": clean.mean[0], "val_acc": clean.extra["accuracy"][0][0]}
        draws, eta = trainer.cfg["eval"]["epoch_draws"], trainer.spec.eta
        if draws > 0 and eta > 0:
            r = evaluate_robustness(trainer.base, trainer.val_loader, [eta], draws, **kw)
            out["val_ppl_noisy"] = r.mean[0]
        return out

    def score(self, row: dict) -> Optional[float]:
        ppl = row.get("val_ppl_noisy", row.get("val_ppl"))
        return None if ppl is None or not math.isfinite(ppl) else -ppl

    def epoch_message(self, row: dict) -> str:
        val = f", val ppl {row['val_ppl']:.3f}" if "val_ppl" in row else ""
        noisy = f", noisy val ppl {row['val_ppl_noisy']:.3f}" if "val_ppl_noisy" in row else ""
        return f"loss {row['train_loss']:.4f}, train ppl {row['train_ppl']:.3f}{val}{noisy}"
