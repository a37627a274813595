"""Accuracy under weight noise, over many simulated chips.

:func:`evaluate_robustness` measures top-1 accuracy at each noise level ``eta``: ``draws`` times
with noise (draw ``k`` is one fixed noisy copy of the weights, a simulated chip, see
:func:`fastnoise.noise`), once without noise for ``eta == 0``. Draw ``k`` uses the same ``z``
at every eta (only sigma changes), so the curve is smooth in eta, and it depends on
:func:`fastnoise.initial_seed` and the layers' ids, not on how far training went. With
``seed=s`` the chips are those of seed ``s`` and of the layers' qualified names in the evaluated
model: two models of the same architecture (a teacher and its students, a model and its deep
copy, a model saved and reloaded) are measured on the same simulated chips.

A causal language model (:mod:`fastnoise.lm`: batches of token ids, a model returning logits
``[B, T, V]``) is measured by its perplexity instead (``exp`` of the mean next-token negative
log-likelihood over every counted token of the data, per chip; lower is better), with the
next-token accuracy of each pass in ``extra["accuracy"]``; the task is read from the batches or
named (``task="causal_lm"``).

The result prints as a table (eta | mean | std | min | max, accuracies in percent or
perplexities, std over draws with Bessel's correction), writes a CSV and a PNG plot; :func:`plot_results` /
:func:`results_table` put several named results side by side.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from . import lm, rng
from .context import noise
from .convert import noisy_layers
from .modules import weight_ids
from .spec import NoiseSpec

__all__ = ["RobustnessResult", "evaluate_robustness", "results_table", "results_to_csv", "plot_results"]


@dataclass
class RobustnessResult:
    """Top-1 accuracies (percent) per eta: ``accuracies[i]`` holds one value per draw of ``etas[i]``.

    For a causal LM (``metric == "perplexity"``) ``accuracies[i]`` holds the perplexities (lower
    is better), ``extra["accuracy"][i]`` the next-token accuracies (percent) of the same passes,
    and ``samples`` counts tokens.
    """

    etas: list
    accuracies: list
    name: str = "model"
    scale: Optional[str] = None
    samples: int = 0
    extra: dict = field(default_factory=dict)
    metric: str = "top1"

    @property
    def what(self) -> str:
        return "perplexity" if self.metric == "perplexity" else "top-1 accuracy (%)"

    def __post_init__(self):
        assert len(self.etas) == len(self.accuracies)

    @property
    def axis(self) -> str:
        """What ``etas`` holds: ``"eta"``, or ``"t"`` (seconds on a chip, ``hardware=``)."""
        return self.extra.get("axis", "eta")

    @property
    def times(self) -> list:
        """The times (s) of a chip result (``hardware=``): the same list as ``etas``."""
        return self.etas

    # statistics --------------------------------------------------------------
    @property
    def mean(self) -> list:
        return [sum(a) / len(a) for a in self.accuracies]

    @property
    def std(self) -> list:
        """Sample standard deviation over draws (0 for a single value)."""
        out = []
        for a, m in zip(self.accuracies, self.mean, strict=True):
            out.append(math.sqrt(sum((v - m) ** 2 for v in a) / (len(a) - 1)) if len(a) > 1 else 0.0)
        return out

    @property
    def min(self) -> list:
        return [min(a) for a in self.accuracies]

    @property
    def max(self) -> list:
        return [max(a) for a in self.accuracies]

    def rows(self) -> list[dict]:
        return [{self.axis: e, "draws": len(a), "mean": m, "std": s, "min": lo, "max": hi}
                for e, a, m, s, lo, hi in zip(self.etas, self.accuracies, self.mean, self.std,
                                              self.min, self.max, strict=True)]

    # output ------------------------------------------------------------------
    def table(self) -> str:
        """A Markdown table: eta | draws | mean | std | min | max (top-1 %)."""
        scale = f", scale={self.scale}" if self.scale else ""
        unit = "tokens" if self.metric == "perplexity" else "samples"
        what = (f"on {self.extra['hardware']} chips" if "hardware" in self.extra
                else f"under weight noise{scale}")
        head = "t (s)" if self.axis == "t" else "eta"
        lines = [f"{self.name}: {self.what} {what}, {self.samples} {unit}",
                 f"| {head} | draws | mean | std | min | max |", "|---|---|---|---|---|---|"]
        for r in self.rows():
            lines.append(f"| {r[self.axis]:g} | {r['draws']} | {r['mean']:.2f} | {r['std']:.2f} | "
                         f"{r['min']:.2f} | {r['max']:.2f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def print(self) -> None:
        print(self.table())

    def to_csv(self, path: str) -> None:
        """One row per eta: ``eta, draws, mean, std, min, max, acc_0, acc_1, ...``."""
        width = max(len(a) for a in self.accuracies) if self.accuracies else 0
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([self.axis, "draws", "mean", "std", "min", "max"] + [f"acc_{k}" for k in range(width)])
            for r, a in zip(self.rows(), self.accuracies, strict=True):
                w.writerow([r[self.axis], r["draws"], r["mean"], r["std"], r["min"], r["max"]] + list(a)
                           + [""] * (width - len(a)))

    def plot(self, path: str, title: Optional[str] = None) -> None:
        """PNG: mean top-1 (or perplexity) against eta with a +-1 std band."""
        plot_results({self.name: self}, path, title=title)


def _as_named(results) -> dict:
    if isinstance(results, RobustnessResult):
        return {results.name: results}
    if isinstance(results, Mapping):
        return dict(results)
    return {r.name: r for r in results}


def results_table(results, digits: int = 1) -> str:
    """A Markdown table with one ``mean +- std`` column per named result (they share the etas)."""
    named = _as_named(results)
    etas = next(iter(named.values())).etas
    for name, r in named.items():
        if list(r.etas) != list(etas):
            raise ValueError(f"result {name!r} has etas {r.etas}, the first has {etas}")
    axis = "t (s)" if next(iter(named.values())).axis == "t" else "eta"
    header = f"| {axis} | " + " | ".join(named) + " |"
    lines = [header, "|---|" + "---|" * len(named)]
    for i, e in enumerate(etas):
        cells = [f"{r.mean[i]:.{digits}f} ± {r.std[i]:.{digits}f}" for r in named.values()]
        lines.append(f"| {e:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_to_csv(results, path: str) -> None:
    """Long format: ``name, eta, draws, mean, std, min, max`` (``t`` for chip results)."""
    named = _as_named(results)
    axis = next(iter(named.values())).axis if named else "eta"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", axis, "draws", "mean", "std", "min", "max"])
        for name, r in named.items():
            for row in r.rows():
                w.writerow([name, row[r.axis], row["draws"], row["mean"], row["std"], row["min"], row["max"]])


def plot_results(results, path: str, title: Optional[str] = None) -> None:
    """One curve (mean, +-1 std band) per named result on one figure, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    named = _as_named(results)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, r in named.items():
        mean = torch.tensor(r.mean)
        std = torch.tensor(r.std)
        ax.plot(r.etas, mean.tolist(), marker="o", label=name)
        ax.fill_between(r.etas, (mean - std).tolist(), (mean + std).tolist(), alpha=0.2)
    first = next(iter(named.values()))
    scale = first.scale
    if first.axis == "t":  # a chip over time: a log time axis
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(f"time after programming (s), {first.extra.get('hardware', 'chip')}")
    else:
        ax.set_xlabel(f"eta (noise scale: {scale})" if scale else "eta")
    ax.set_ylabel(first.what)
    ax.set_title(title or (f"{first.what} on chips over time (mean ± std over chips)" if first.axis == "t"
                           else f"{first.what} under weight noise (mean ± std over draws)"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluation
def _check_etas(etas) -> list:
    etas = list(etas)
    if not etas:
        raise ValueError("etas is empty")
    for e in etas:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise ValueError(f"each eta must be a finite number >= 0, got {e!r}")
    return [float(e) for e in etas]


class TargetError(ValueError):
    """Targets or outputs that top-1 cannot score (a ``TargetTypeError`` is a TypeError too)."""


class TargetTypeError(TargetError, TypeError):
    pass


def check_targets(y, n: int, where: str) -> None:
    """Targets of a batch of ``n`` outputs must be ``[n]`` class indices: an integer tensor (not
    bool or float), one per output (a ``[n, 1]`` column would broadcast against ``[n]``
    predictions into an ``n x n`` comparison). ``where`` names the batch in the error."""
    if not isinstance(y, torch.Tensor):
        raise TargetTypeError(f"the targets of {where} are a {type(y).__name__}, not a tensor of class "
                              "indices")
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        dtype = str(y.dtype).replace("torch.", "")
        raise TargetTypeError(f"the targets of {where} are {dtype}: they must be class indices, an integer "
                              "tensor (e.g. .long())")
    if y.shape != (n,):
        hint = " (squeeze the [n, 1] column to [n])" if y.dim() == 2 and y.shape[1] == 1 else ""
        raise TargetError(f"the targets of {where} have shape {list(y.shape)}, but the model gave {n} "
                         f"outputs: targets must be [batch] class indices{hint}")


def check_output(out, n: int, where: str) -> int:
    """The model's output for ``n`` inputs must be ``[n, classes]`` logits; returns ``classes``."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TargetError(f"the model's output for {where} ({n} inputs) has shape {got}: top-1 needs "
                         "[batch, classes] logits")
    return int(out.shape[1])


def first_bad_target(y: torch.Tensor, classes: int) -> Optional[int]:
    """The position of the first target outside ``[0, classes)`` (None if all are inside)."""
    bad = ((y < 0) | (y >= classes)).nonzero()
    return int(bad[0, 0]) if bad.numel() else None


def target_range_error(y: torch.Tensor, j: int, classes: int, where: str) -> str:
    hint = " (1-based labels? class indices start at 0)" if int(y[j]) == classes else ""
    return (f"the target at position {j} of {where} is {int(y[j])}, outside [0, {classes}): the model has "
            f"{classes} outputs{hint}")


def _one_pass(model: nn.Module, loader: Iterable, device, autocast_dtype, channels_last,
              task: Optional[str]) -> tuple[str, list]:
    """One pass over ``loader``: ``("classification", [correct, total])`` or, for a causal LM (named, or
    read from the first batch), ``("causal_lm", [nll sum, tokens, correct])``."""
    stats: list = []
    options = None
    for b, batch in enumerate(loader):
        if task is None:
            task = "causal_lm" if lm.is_token_batch(batch) else "classification"
        amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        if task == "causal_lm":
            b = lm.as_batch(batch, device)
            options = lm.call_options(model) if options is None else options
            with amp:
                logits = lm.logits_of(model, b, options)
            nll, tokens, correct = lm.token_stats(logits, lm.shifted_targets(b))
            got = [float(nll), float(tokens), float(correct)]
            stats = got if not stats else [a + g for a, g in zip(stats, got, strict=True)]
            continue
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError("the loader must yield (inputs, targets) pairs (or, for a causal LM, "
                            "token-id tensors [batch, T] or dicts with 'input_ids')")
        got = _top1_batch(model, batch, device, amp, channels_last, b, stats[1] if stats else 0)
        stats = got if not stats else [a + g for a, g in zip(stats, got, strict=True)]
    return (task or "classification"), stats


def _top1_batch(model: nn.Module, batch, device, amp, channels_last, b: int, seen: int) -> list:
    """[hits, samples] of batch ``b`` (``seen`` samples before it), its targets and output checked."""
    x, y = batch[0].to(device, non_blocking=True), batch[1]
    where = f"batch {b} (samples {seen} to {seen + len(x) - 1} of the loader)"
    check_targets(y, len(x), where)
    y = y.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with amp:
        out = model(x)
    classes = check_output(out, len(x), where)
    # one read back per batch, as before: the hits and the targets outside [0, classes)
    hits, outside = torch.stack([(out.argmax(-1) == y).sum(), ((y < 0) | (y >= classes)).sum()]).tolist()
    if outside:
        raise TargetError(target_range_error(y, first_bad_target(y, classes), classes, where))
    return [int(hits), int(y.numel())]


def evaluate_robustness(model: nn.Module, loader: Iterable, etas: Optional[Sequence[float]] = None,
                        draws: Optional[int] = None, spec: Optional[NoiseSpec] = None, *, device=None,
                        progress: bool = True, name: str = "model",
                        autocast_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                        distributed: bool = False, pregenerate: Optional[bool] = None,
                        seed: Optional[int] = None, hardware=None,
                        times: Optional[Sequence[float]] = None,
                        task: Optional[str] = None) -> RobustnessResult:
    """Top-1 accuracy (percent), or a causal LM's perplexity, of ``model`` on ``loader`` under
    weight noise, or on chips of a hardware model over time.

    For each ``eta``: one clean pass if ``eta == 0``, else ``draws`` passes, pass ``k`` inside
    ``fastnoise.noise(eta=eta, scale=spec.scale, draw=k)`` (one fixed noisy copy of the weights
    for the whole pass). The model runs in eval mode under ``torch.inference_mode`` and gets its
    previous mode back.

    Args:
        model: a model with fastnoise layers (:func:`fastnoise.convert`).
        loader: yields ``(inputs, targets)``, or token-id batches (:mod:`fastnoise.lm`: an
            integer tensor ``[B, T]`` or a dict with ``input_ids``, ``attention_mask``,
            ``labels``); iterated once per pass.
        etas: noise levels (finite, >= 0).
        draws: simulated chips per nonzero eta (>= 1).
        spec: its ``scale`` and ``noise_bias`` replace the layers' (its ``eta`` is not used);
            None keeps each layer's own.
        device: where inputs go (default: the model's parameters' device).
        progress: a bar over the passes on a terminal, else a plain line every tenth of them.
        name: the result's name (column / legend).
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (e.g. bf16).
        channels_last: pass 4-D inputs in channels_last memory format.
        distributed: sum the counts over the process group (each rank holds a shard).
        pregenerate: run the passes inside :func:`fastnoise.pregenerate.pregenerated`, which
            draws each chip's noisy weights once per pass instead of once per batch (same
            results, one noisy copy of the weights held at a time); None: on, on every device
            (measured 0.47-0.52x the time of per-batch noise for resnet18 on the CPU,
            ``bench/test_bench_cpu.py``). ``False``: each batch draws its layers' noise again.
        seed: the chips: draw ``k`` of seed ``seed``, each layer named by its place in ``model``
            (see the module docstring). None: :func:`fastnoise.initial_seed` and the layers' own
            ids.
        hardware: instead of ``etas``, a hardware model (``fastnoise.PCM()`` or its name,
            ``"pcm"``), with ``times``: pass ``k`` at time ``t`` runs inside
            ``fastnoise.noise(hardware=hardware, t=t, draw=k, seed=seed)``, chip ``k`` the same at
            every time.
        times: the times (s after programming) to evaluate on ``hardware``; the result's
            ``etas`` (also ``times``) hold them.
        task: ``"classification"`` (top-1) or ``"causal_lm"`` (perplexity, next-token
            accuracy in ``extra["accuracy"]``); None: read from the first batch (token ids:
            ``causal_lm``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if hardware is not None or times is not None:
        hardware, times = _check_hardware(model, hardware, times, etas)
        etas = times
    else:
        if etas is None:
            raise ValueError("give etas (noise levels), or hardware= and times=")
        etas = _check_etas(etas)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    if spec is not None and not isinstance(spec, NoiseSpec):
        raise TypeError(f"spec must be a fastnoise.NoiseSpec or None, got {type(spec).__name__}")
    if hardware is None and any(e > 0 for e in etas) and not noisy_layers(model):
        raise ValueError("the model has no fastnoise layers, so noise cannot be applied: "
                         "convert it first with fastnoise.convert(model, spec)")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    if seed is not None:
        rng.check_seed(seed)
    if task is not None and task not in lm.TASKS:
        raise ValueError(f"task must be one of {list(lm.TASKS)} or None, got {task!r}")
    overrides = {} if spec is None else {"scale": spec.scale, "noise_bias": spec.noise_bias}
    passes = [(i, e, k) for i, e in enumerate(etas)
              for k in (range(1) if e == 0 and hardware is None else range(draws))]

    bar = None
    if progress:
        from .progress import progress_bar

        bar = progress_bar(len(passes), f"robustness {name}")
    was_training = model.training
    model.eval()
    results: list = [[] for _ in etas]
    token_acc: list = [[] for _ in etas]
    samples = 0
    if pregenerate is None:
        pregenerate = True
    keep = contextlib.nullcontext()
    if pregenerate:
        from .pregenerate import pregenerated

        keep = pregenerated(model)
    named = noisy_layers(model) if seed is not None else []
    for qualified, layer in named:  # the chips follow the layers' places in this model
        layer.__dict__["_draw_wids"] = weight_ids(rng.key_id(qualified), layer.noise_weights)
    try:
        with torch.inference_mode(), keep:
            for i, e, k in passes:
                if hardware is not None:
                    ctx = noise(hardware=hardware, t=e, draw=k, seed=seed)
                elif e == 0:
                    ctx = noise(enabled=False)
                else:
                    ctx = noise(eta=e, draw=k, seed=seed, **overrides)
                with ctx:
                    task, stats = _one_pass(model, loader, device, autocast_dtype, channels_last, task)
                if not stats:
                    stats = [0.0, 0.0, 0.0] if task == "causal_lm" else [0, 0]
                if distributed:
                    from torch import distributed as dist

                    t = torch.tensor(stats, dtype=torch.float64, device=device)
                    dist.all_reduce(t)
                    stats = t.tolist()
                if task == "causal_lm":
                    nll, tokens, correct = stats
                    if tokens == 0:
                        raise ValueError("the loader yielded no tokens to predict")
                    samples = int(tokens)
                    results[i].append(lm.perplexity(nll, tokens))
                    token_acc[i].append(100.0 * correct / tokens)
                else:
                    correct, total = stats
                    if total == 0:
                        raise ValueError("the loader yielded no samples")
                    samples = int(total)
                    results[i].append(100.0 * correct / total)
                if bar is not None:
                    bar.update(1)
    finally:
        for _, layer in named:
            layer.__dict__.pop("_draw_wids", None)
        model.train(was_training)
        if bar is not None:
            bar.close()
    causal = task == "causal_lm"
    extra = {} if hardware is None else {"axis": "t", "hardware": hardware.name}
    if causal:
        extra["accuracy"] = token_acc
    return RobustnessResult(etas, results, name=name,
                            scale=spec.scale if spec is not None else _layer_scale(model), samples=samples,
                            extra=extra, metric="perplexity" if causal else "top1")


def _check_hardware(model: nn.Module, hardware, times, etas):
    """(hardware model, times) of a chip evaluation, or one clear error."""
    from .hardware import by_name
    from .hardware.base import HardwareModel, check_time

    if hardware is None:
        raise ValueError("times= are times on a chip: give hardware= too (e.g. fastnoise.PCM())")
    if isinstance(hardware, str):
        hardware = by_name(hardware)
    if not isinstance(hardware, HardwareModel):
        raise TypeError(f"hardware must be a fastnoise hardware model (e.g. fastnoise.PCM()) or its "
                        f"name, got {type(hardware).__name__}")
    if etas is not None:
        raise ValueError("give etas (Gaussian noise) or hardware= with times=, not both")
    if times is None:
        raise ValueError("hardware= needs times=, the seconds after programming (e.g. [1, 86400])")
    times = list(times)
    if not times:
        raise ValueError("times is empty")
    times = [check_time(t) for t in times]
    if not noisy_layers(model):
        raise ValueError(f"hardware={hardware.name!r} was given, but the model has no fastnoise "
                         "layers to put on the chip: convert it first with fastnoise.convert(model, spec)")
    return hardware, times


def _layer_scale(model: nn.Module) -> Optional[str]:
    scales = {m.spec.scale for _, m in noisy_layers(model)}
    return scales.pop() if len(scales) == 1 else None
