"""Causal language models: what a batch of token ids is, a model's logits, next-token loss and perplexity.

A sample is a LongTensor ``[T]`` of token ids, or a dict with ``input_ids`` (``[T]``) and
optionally ``attention_mask`` (1 for a real token, 0 for padding) and ``labels`` (the token to
predict at each place, ``-100`` for none, as Hugging Face writes them). A batch is their default
collation: a LongTensor ``[B, T]`` or a dict of ``[B, T]`` tensors. :func:`as_batch` puts either
into one form, a dict.

The model is a Hugging Face causal LM (its output has ``.logits``) or any module that maps
``input_ids [B, T]`` to logits ``[B, T, V]`` (a tensor, or a tuple whose first item is one). It
is called as ``model(input_ids, attention_mask=..., use_cache=False)``, each keyword passed only
where its ``forward`` takes it (:func:`call_options`).

The targets at place ``t`` are the token at ``t + 1``: ``labels`` where given, else ``input_ids``,
with every place whose ``attention_mask`` is 0 masked (``-100``). :func:`token_stats` sums the
negative log-likelihood, the counted tokens and the right argmax guesses over a batch, in
float64; perplexity is ``exp(sum nll / tokens)`` over the whole data (not a mean of per-batch
perplexities), next-token accuracy ``100 * correct / tokens``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TASKS", "IGNORE_INDEX", "is_token_sample", "is_token_batch", "as_batch", "call_options",
           "logits_of", "shifted_targets", "token_stats", "perplexity", "vocab_size_of", "max_positions_of"]

TASKS = ("classification", "causal_lm")
IGNORE_INDEX = -100
_KEYS = ("input_ids", "attention_mask", "labels")


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def is_token_sample(sample) -> bool:
    """A LongTensor ``[T]`` (any integer dtype) or a mapping with ``input_ids``."""
    if isinstance(sample, torch.Tensor):
        return sample.dim() == 1 and _integer(sample)
    return isinstance(sample, Mapping) and "input_ids" in sample


def is_token_batch(batch) -> bool:
    """A batch of token samples: an integer tensor ``[B, T]`` or a mapping with ``input_ids``."""
    if isinstance(batch, torch.Tensor):
        return batch.dim() == 2 and _integer(batch)
    return isinstance(batch, Mapping) and "input_ids" in batch


def as_batch(batch, device=None) -> dict:
    """``{"input_ids", "attention_mask"?, "labels"?}`` of ``[B, T]`` tensors, on ``device``."""
    if isinstance(batch, torch.Tensor):
        out = {"input_ids": batch}
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        out = {k: batch[k] for k in _KEYS if batch.get(k) is not None}
    else:
        raise TypeError(f"a causal-LM batch is an integer tensor [batch, T] of token ids or a dict with "
                        f"'input_ids', got {type(batch).__name__}")
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 2:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise TypeError(f"a causal-LM batch's {k!r} must be a tensor [batch, T], got {got}")
    if device is not None:
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP and similar wrappers
        model = model.module
    return model


def call_options(model: nn.Module) -> tuple[bool, bool]:
    """Whether ``model``'s ``forward`` takes ``attention_mask`` and ``use_cache`` (a ``**kwargs``
    counts only for a Hugging Face model: one with a ``config``)."""
    base = _unwrap(model)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False, False
    hf = hasattr(base, "config")
    var_kw = hf and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return ("attention_mask" in params or var_kw), ("use_cache" in params or var_kw)


def logits_of(model: nn.Module, batch: dict, options: Optional[tuple] = None) -> torch.Tensor:
    """The logits ``[B, T, V]`` of ``model`` on ``batch`` (a dict from :func:`as_batch`)."""
    mask_ok, cache_ok = call_options(model) if options is None else options
    kw = {}
    if mask_ok and "attention_mask" in batch:
        kw["attention_mask"] = batch["attention_mask"]
    if cache_ok:
        kw["use_cache"] = False
    out = model(batch["input_ids"], **kw)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__}: a causal LM must return logits "
                        "[batch, T, vocab] (a tensor, a tuple starting with one, or an output with .logits)")
    return logits


def shifted_targets(batch: dict) -> torch.Tensor:
    """The token to predict after each place but the last, ``[B, T - 1]``; ``-100`` where none."""
    labels = batch.get("labels")
    labels = batch["input_ids"] if labels is None else labels
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return labels[:, 1:].long()


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple:
    """``(sum of nll, tokens counted, right argmax guesses)`` of logits ``[B, T, V]`` against the
    shifted targets ``[B, T - 1]``; the nll in float32 with autograd, the counts in float64."""
    lg = logits[:, :-1]
    flat = lg.reshape(-1, lg.shape[-1]).float()
    t = targets.reshape(-1)
    nll = F.cross_entropy(flat, t, ignore_index=IGNORE_INDEX, reduction="sum")
    keep = t != IGNORE_INDEX
    tokens = keep.sum().to(torch.float64)
    correct = ((flat.detach().argmax(-1) == t) & keep).sum().to(torch.float64)
    return nll, tokens, correct


def perplexity(nll_sum: float, tokens: float) -> float:
    """``exp(nll_sum / tokens)`` (inf where it overflows, nan without tokens)."""
    if tokens <= 0:
        return math.nan
    mean = nll_sum / tokens
    return math.exp(mean) if mean < 700 else math.inf


def vocab_size_of(model: nn.Module) -> Optional[int]:
    """A Hugging Face model's ``config.vocab_size`` (None for another module)."""
    cfg = getattr(_unwrap(model), "config", None)
    v = getattr(cfg, "vocab_size", None)
    return int(v) if isinstance(v, int) else None


def max_positions_of(model: nn.Module) -> Optional[int]:
    """The longest sequence a Hugging Face model's positions allow (``max_position_embeddings``,
    GPT-2's ``n_positions``), None where its config names none."""
    cfg = getattr(_unwrap(model), "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
