"""Make a model noisy (:func:`convert`), undo it (:func:`restore`), and say what is noisy
(:func:`coverage`); the noise state of a model (:func:`noise_state_dict`).

What ``convert`` does to each module (the mechanism is in :mod:`fastnoise.intercept`):

- ``nn.Linear`` / ``nn.Conv2d``, and subclasses that keep their ``forward`` (``out_proj`` of
  ``nn.MultiheadAttention``, parametrized layers, ``LazyLinear`` / ``LazyConv2d`` once
  materialized): their class becomes ``fastnoise.Linear`` / ``fastnoise.Conv2d`` (fused ops);
- modules whose weights reach a matmul or convolution without a fused op: ``MultiheadAttention``
  (``in_proj_weight`` or ``q/k/v_proj_weight``), ``RNN`` / ``LSTM`` / ``GRU`` and their cells,
  ``Conv1d`` / ``Conv3d`` / ``ConvTranspose*`` (and their lazy forms), ``Bilinear``, Hugging Face's
  ``Conv1D``, a ``Linear`` subclass with a ``forward`` of its own, and any module with parameters
  of two or more dimensions: a noisy class whose ``forward`` opens a noise scope;
- the converted model itself: a noisy class whose ``forward`` opens the scope, so uses of a weight
  outside its module's ``forward`` (Swin's ``qkv``, ``MultiheadAttention``'s ``out_proj``,
  ``x @ self.W``) are caught too.

Classes are swapped in place: parameters, hooks, ``state_dict`` keys and the optimizers built
before stay valid. ``nn.Embedding`` lookups are not matmuls and stay clean unless
``embeddings=True``; norm scales and biases (without ``noise_bias``) are not weights.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from . import rng
from .intercept import ScopeMixin, base_class, invalidate, noisy_class
from .modules import Conv2d, Linear, NoisyMixin, counter_name
from .spec import NoiseSpec
from .tile import TileSpec, clip_weight_

__all__ = ["convert", "restore", "coverage", "noisy_layers", "noise_state_dict", "load_noise_state_dict",
           "CoverageReport", "CoverageWarning", "clip_weights"]

Exclude = Union[None, str, Iterable[str], Callable[[str, object], bool]]


class CoverageWarning(UserWarning):
    """``convert`` left weights clean, or an ``exclude`` pattern matched nothing."""


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_UNREACHABLE = "unreachable"  # reasons starting with this make strict=True raise


# ----------------------------------------------------------------------------- planning
def _fast_kind(module: nn.Module) -> Optional[str]:
    """``"linear"`` / ``"conv2d"`` when the drop-in layer's forward serves the module's class."""
    cls = type(module)
    if issubclass(cls, nn.Linear) and cls.forward is nn.Linear.forward:
        return "linear"
    if (issubclass(cls, nn.Conv2d) and cls.forward is nn.Conv2d.forward
            and cls._conv_forward is nn.Conv2d._conv_forward):
        return "conv2d"
    return None


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _own(module: nn.Module, name: str) -> bool:
    return module._parameters.get(name) is not None


def _matrix(p) -> bool:
    """A parameter of two or more dimensions (a lazy one counts: it will be a layer's weight)."""
    if p is None:
        return False
    if isinstance(p, nn.parameter.UninitializedParameter):
        return True
    return p.dim() >= 2


def _shape(p) -> str:
    return "" if p is None or isinstance(p, nn.parameter.UninitializedParameter) else f" {list(p.shape)}"


def _plan(module: nn.Module, embeddings: bool):
    """(kind, weights, transposed, skipped, known) for one module: kind ``"linear"`` /
    ``"conv2d"`` / ``"holder"`` / None; ``skipped`` maps own weights left clean to the reason;
    ``known``: whether the weights are matmul weights by the module's type (else candidates that
    get noise where a matmul uses them)."""
    skipped: dict = {}
    own2d = [n for n, p in module._parameters.items() if _matrix(p)]
    if isinstance(module, torch.jit.ScriptModule):
        for n in own2d:
            skipped[n] = f"{_UNREACHABLE}: a TorchScript module (its code cannot be intercepted)"
        return None, [], set(), skipped, True
    if parametrize.is_parametrized(module) and _fast_kind(module) is None:
        for n in module.parametrizations.keys():
            skipped[n] = (f"{_UNREACHABLE}: a parametrized weight of {type(module).__name__} "
                          "(only parametrized Linear and Conv2d are supported)")
    fast = _fast_kind(module)
    if fast is not None and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return fast, ["weight"], set(), skipped, True
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        if isinstance(module, _NORMS):
            return None, [], set(), skipped, True
        return "holder", ["weight"], set(), skipped, True
    if isinstance(module, nn.MultiheadAttention):
        names = [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                 if _own(module, n)]
        return "holder", names, set(), skipped, True
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        names = [n for n in module._parameters if n.startswith("weight") and _own(module, n)]
        return "holder", names, set(), skipped, True
    if isinstance(module, _ConvNd):
        transposed = {"weight"} if isinstance(module, _ConvTransposeNd) and module.groups == 1 else set()
        return "holder", ["weight"], transposed, skipped, True
    if isinstance(module, nn.Bilinear):
        return "holder", ["weight"], set(), skipped, True
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        if embeddings:
            return "holder", ["weight"], set(), skipped, True
        skipped["weight"] = "an embedding lookup, not a matmul (convert(..., embeddings=True) noises it)"
        return None, [], set(), skipped, True
    if _is_hf_conv1d(module):
        return "holder", ["weight"], {"weight"}, skipped, True
    if isinstance(module, _NORMS):
        return None, [], set(), skipped, True
    if isinstance(module, nn.Linear) and _own(module, "weight"):  # a forward of its own
        return "holder", ["weight"], set(), skipped, True
    names = [n for n in own2d if n not in skipped]
    return ("holder" if names else None), names, set(), skipped, False


def _match(exclude: Exclude, name: str, obj, used: set) -> bool:
    if exclude is None:
        return False
    if callable(exclude) and not isinstance(exclude, str):
        return bool(exclude(name, obj))
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    hit = False
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            used.add(p)
            hit = True
    return hit


def _patterns(exclude: Exclude) -> list:
    if exclude is None or (callable(exclude) and not isinstance(exclude, str)):
        return []
    return [exclude] if isinstance(exclude, str) else list(exclude)


def _qual(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------- convert
def convert(model: nn.Module, spec: Optional[NoiseSpec] = None, exclude: Exclude = None, *,
            strict: bool = False, embeddings: bool = False, tile: Optional[TileSpec] = None) -> nn.Module:
    """Make every weight of ``model`` that feeds a matmul or a convolution noisy, in place;
    returns ``model`` (see the module docstring for what happens to each kind of module).

    Each noisy module gets ``spec`` and an identity from its qualified name in ``model`` (so the
    noise of two copies of a layer differs, and a fresh model of the same architecture draws the
    same noise). Converting a model again applies the new spec and names its layers by their
    places in it.

    Args:
        spec: the noise of every converted weight (default ``NoiseSpec()``).
        exclude: what to leave clean: a glob on module or weight names (``"fc"``, ``"layer4.*"``,
            ``"*.in_proj_weight"``), a list of globs, or a callable ``(name, module_or_weight) ->
            bool``. A pattern that matches nothing is reported.
        strict: raise ``ValueError`` for a weight that cannot be reached (a TorchScript module, a
            parametrized weight of an unsupported layer) or a pattern that matched nothing,
            instead of warning.
        embeddings: also noise ``nn.Embedding`` / ``EmbeddingBag`` lookups.
        tile: put every linear and conv2d (groups 1) weight on this crossbar tile
            (:class:`fastnoise.TileSpec`, ``docs/tile.md``): the drop-in layers and the
            ``F.linear`` / ``F.conv2d`` calls a noise scope routes. Each such layer gets an
            ``input_range`` parameter (build the optimizer after ``convert``). Weights used by
            other ops (attention's ``in_proj_weight``, RNNs, Conv1d, ...) keep the weight noise
            without the tile, and one :class:`CoverageWarning` names them.

    Weights left clean (excluded, embedding lookups, unreachable) are named, with the reason, in
    one :class:`CoverageWarning`; :func:`coverage` reports on every parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    spec = NoiseSpec() if spec is None else spec
    if not isinstance(spec, NoiseSpec):
        raise TypeError(f"spec must be a fastnoise.NoiseSpec, got {type(spec).__name__}")
    if not isinstance(strict, bool) or not isinstance(embeddings, bool):
        raise TypeError(f"strict and embeddings must be bools, got {strict!r} and {embeddings!r}")
    if tile is not None and not isinstance(tile, TileSpec):
        raise TypeError(f"tile must be a fastnoise.TileSpec or None, got {type(tile).__name__}")
    invalidate()
    used: set = set()
    clean: dict = {}
    off_tile: list = []
    for name, module in list(model.named_modules()):
        if _match(exclude, name, module, used):
            if isinstance(module, (NoisyMixin, ScopeMixin)) and module is not model:
                _restore_one(module)
            for pname, p in module._parameters.items():
                if _matrix(p):
                    clean[_qual(name, pname)] = "excluded"
            continue
        if isinstance(module, NoisyMixin):  # converted before: the new spec, named by its place now
            module.spec = spec
            module._bind(name)
            if isinstance(module, (Linear, Conv2d)) and module.tile != tile and _tileable(module, tile):
                module.set_tile(tile)
            continue
        if isinstance(module, ScopeMixin):
            continue
        kind, weights, transposed, skipped, known = _plan(module, embeddings)
        for pname, why in skipped.items():
            clean[_qual(name, pname)] = why
        kept = []
        for pname in weights:
            if _match(exclude, _qual(name, pname), module._parameters.get(pname, module), used):
                clean[_qual(name, pname)] = "excluded"
            else:
                kept.append(pname)
        if kind is None or not kept:
            continue
        _make_noisy(module, kind, kept, transposed, known, spec, name, embeddings)
        if tile is not None:
            if kind in ("linear", "conv2d") and _tileable(module, tile):
                module.set_tile(tile)
            else:
                why = "groups > 1" if kind == "conv2d" else f"a {type(module).__name__} (not linear / conv2d)"
                off_tile.extend(f"  {_qual(name, w)}: {why}" for w in kept)
    if off_tile:
        warnings.warn("fastnoise.convert: the crossbar tile does not reach these weights (they get the "
                      "weight noise only):\n" + "\n".join(off_tile), CoverageWarning, stacklevel=2)
    if not isinstance(model, (NoisyMixin, ScopeMixin)):
        model.__class__ = noisy_class("scope", type(model))
    unmatched = [p for p in _patterns(exclude) if p not in used]
    # a weight tied to a noisy one (GPT-2's embedding and lm_head) is not left clean: say it apart
    noisy_ids = {id(m._parameters[w]) for _, m in noisy_layers(model) for w in m.noise_weights
                 if m._parameters.get(w) is not None}
    params = dict(model.named_parameters(remove_duplicate=False))
    clean = {q: why for q, why in clean.items() if q not in params or id(params[q]) not in noisy_ids}
    model.__dict__["_fastnoise_clean"] = dict(clean)
    model.__dict__["_fastnoise_unmatched"] = list(unmatched)
    _report_convert(model, clean, unmatched, strict)
    return model


def _tileable(module, tile) -> bool:
    return tile is None or getattr(module, "groups", 1) == 1


def clip_weights(model: nn.Module) -> nn.Module:
    """Clip the weight of every layer of ``model`` whose crossbar tile clips (``TileSpec.clip``),
    in place; call it after every optimizer step of your own loop (``fastnoise.train`` does)."""
    for _, m in noisy_layers(model):
        tile = m.tile
        if tile is not None and tile.clip is not None:
            clip_weight_(m.weight, tile)
    return model


def _make_noisy(module, kind, weights, transposed, known, spec, name, embeddings) -> None:
    lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin)
    if kind in ("linear", "conv2d"):
        module.__class__ = noisy_class(kind, type(module))
    else:
        if lazy:  # materialized by its first forward into a noisy class of the torch layer
            after = module.cls_to_become
            fast = {nn.Linear: Linear, nn.Conv2d: Conv2d}.get(after)
            module.cls_to_become = fast if fast is not None else noisy_class("holder", after)
        module.__class__ = noisy_class("holder", type(module))
    module._init_noise(spec, weights, key=name)
    if transposed:
        module.noise_transposed = frozenset(transposed)
    if not known:
        module.noise_candidates = frozenset(weights)
    if embeddings and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        module.noise_embeddings = True


def _report_convert(model, clean: dict, unmatched: list, strict: bool) -> None:
    if not clean and not unmatched:
        return
    params = dict(model.named_parameters(remove_duplicate=False))
    lines = []
    if clean:
        lines.append(f"fastnoise.convert left {len(clean)} weight(s) clean:")
        for qual, why in clean.items():
            lines.append(f"  {qual}{_shape(params.get(qual))}: {why}")
    for p in unmatched:
        lines.append(f"fastnoise.convert: exclude pattern {p!r} matched no module or weight")
    message = "\n".join(lines)
    bad = [q for q, why in clean.items() if why.startswith(_UNREACHABLE)]
    if strict and (bad or unmatched):
        raise ValueError(message + "\n(strict=True: every weight must be reached and every pattern match)")
    warnings.warn(message, CoverageWarning, stacklevel=3)


# ----------------------------------------------------------------------------- restore
def _restore_one(module: nn.Module) -> None:
    cls = type(module)
    if isinstance(module, NoisyMixin):
        module._drop_noise()
    for attr in ("noise_uses", "noise_transposed", "noise_candidates", "noise_embeddings", "_draw_wids",
                 "_fastnoise_table"):
        module.__dict__.pop(attr, None)
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and "cls_to_become" in module.__dict__:
        del module.__dict__["cls_to_become"]
    if isinstance(module, (NoisyMixin, ScopeMixin)):
        module.__class__ = base_class(cls)


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` (and turn ``fastnoise.Linear``/``Conv2d`` into torch's), in place."""
    invalidate()
    for module in model.modules():
        _restore_one(module)
    for attr in ("_fastnoise_clean", "_fastnoise_unmatched"):
        model.__dict__.pop(attr, None)
    return model


# ----------------------------------------------------------------------------- queries
def noisy_layers(model: nn.Module) -> list:
    """``(name, module)`` for every module of ``model`` that holds noisy weights."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NoisyMixin) and "spec" in m.__dict__]


def noise_state_dict(model: nn.Module) -> dict:
    """Ids and call counters of the noisy modules: with them a resumed run sees the same noise."""
    out = {}
    for n, m in noisy_layers(model):
        calls = {w: int(m._buffers[counter_name(w)]) for w in m.noise_weights}
        out[n] = {"id": m.noise_id, "key": m.noise_key,
                  "calls": calls["weight"] if list(calls) == ["weight"] else calls}
    return out


def load_noise_state_dict(model: nn.Module, state: dict) -> None:
    """Restore what :func:`noise_state_dict` saved (the same noisy modules, by name)."""
    layers = dict(noisy_layers(model))
    if set(layers) != set(state):
        missing, extra = sorted(set(layers) - set(state)), sorted(set(state) - set(layers))
        raise ValueError(f"noise state does not match the model: missing {missing}, unexpected {extra}")
    for name, s in state.items():
        m = layers[name]
        calls = s["calls"] if isinstance(s["calls"], dict) else {"weight": s["calls"]}
        if set(calls) != set(m.noise_weights):
            raise ValueError(f"noise state of {name!r} counts {sorted(calls)}, the module has "
                             f"{sorted(m.noise_weights)}")
        m._set_id(int(s["id"]))
        m.noise_key = s.get("key", m.noise_key)
        m._noise_epoch = rng.noise_epoch()
        for w, c in calls.items():
            m._buffers[counter_name(w)].fill_(int(c))


# ----------------------------------------------------------------------------- coverage
@dataclass
class CoverageEntry:
    name: str
    shape: tuple
    noisy: bool
    how: str  # noisy: through what; clean: why


@dataclass
class CoverageReport:
    """What :func:`coverage` found: one entry per parameter of the model."""

    entries: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)

    @property
    def noisy(self) -> dict:
        """``{name: how}`` of the noisy weights."""
        return {e.name: e.how for e in self.entries if e.noisy}

    @property
    def clean(self) -> dict:
        """``{name: why}`` of the parameters without noise."""
        return {e.name: e.how for e in self.entries if not e.noisy}

    def table(self) -> str:
        lines = ["| parameter | shape | noisy | how / why |", "|---|---|---|---|"]
        for e in self.entries:
            lines.append(f"| {e.name} | {list(e.shape)} | {'yes' if e.noisy else 'no'} | {e.how} |")
        for p in self.unmatched:
            lines.append(f"| (exclude pattern {p!r}) | | | matched nothing |")
        return "\n".join(lines)

    def __str__(self) -> str:
        n = sum(e.noisy for e in self.entries)
        return f"{n} of {len(self.entries)} parameters noisy\n" + self.table()


def _how(holder, wname: str) -> tuple[Optional[bool], str]:
    """(noisy, how) of a holder's weight; noisy None while a candidate has not been used yet."""
    uses = holder.__dict__.get("noise_uses", {}).get(wname, {})
    noisy_ops = sorted(op for op, v in uses.items() if v == "noisy")
    other = sorted(op for op, v in uses.items() if v != "noisy")
    if isinstance(holder, (Linear, Conv2d)):
        how = f"fastnoise.{'Linear' if isinstance(holder, Linear) else 'Conv2d'} (fused)"
        return True, how + (f"; also {', '.join(noisy_ops)}" if noisy_ops else "")
    if noisy_ops:
        return True, "noisy weight in " + ", ".join(noisy_ops)
    if wname in holder.__dict__.get("noise_candidates", ()):
        if other:
            return False, f"used only by {', '.join(other)} (not a matmul)"
        return None, "no forward seen yet (noisy where a matmul uses it)"
    return True, f"noisy weight in {base_class(type(holder)).__name__}'s forward"


def coverage(model: nn.Module) -> CoverageReport:
    """Which parameters of ``model`` get noise, how, and why the others do not.

    Weights of known layers are reported from their type; other parameters of two or more
    dimensions (a class token, a position embedding, a user's raw matmul weight) from what the
    noise scope saw them used by, so run a training forward first for the full picture.
    """
    by_id: dict = {}
    for hname, h in noisy_layers(model):
        for w in h.noise_weights:
            p = h._parameters.get(w)
            if p is not None:
                by_id.setdefault(id(p), []).append((hname, h, w))
    clean_at_convert = {}
    for _, m in model.named_modules():
        clean_at_convert.update(m.__dict__.get("_fastnoise_clean", {}))
    holders = dict(noisy_layers(model))
    report = CoverageReport(unmatched=list(model.__dict__.get("_fastnoise_unmatched", [])))
    for qual, p in model.named_parameters():
        owners = by_id.get(id(p))
        if owners:
            parts, noisy = [], False
            for hname, h, w in owners:
                state, how = _how(h, w)
                noisy = noisy or bool(state)
                parts.append(how if len(owners) == 1 else f"{hname or 'model'}: {how}")
            report.entries.append(CoverageEntry(qual, tuple(p.shape), noisy, "; ".join(parts)))
            continue
        mname, _, pname = qual.rpartition(".")
        holder = holders.get(mname)
        if qual in clean_at_convert:
            why = clean_at_convert[qual]
        elif holder is not None and pname.replace("bias", "weight", 1) in holder.noise_weights:
            if holder.spec.noise_bias:
                report.entries.append(CoverageEntry(qual, tuple(p.shape), True, "noisy bias (noise_bias)"))
                continue
            why = "a bias (noise_bias=False)"
        elif p.dim() < 2:
            why = "a 1-D parameter (norm scale, bias, ...): not a matmul weight"
        else:
            why = "not converted (call fastnoise.convert on the model)"
        report.entries.append(CoverageEntry(qual, tuple(p.shape), False, why))
    return report
