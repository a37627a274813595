"""``fastnoise study``: every method from one teacher, several seeds, on the same simulated chips.

What it does, for a recipe (any recipe: the study sets ``method.name`` itself):

1. trains one clean teacher (``teacher.epochs`` of the recipe, in ``OUT/teacher``), or takes
   ``teacher.weights``;
2. for each seed ``s`` trains one student per method (``clean``, ``noise``, ``kd``,
   ``consistency``) from that teacher with ``seed=s`` (data order, augmentation and training
   noise follow the seed), in ``OUT/seed{s}/{method}``;
3. measures every model (the teacher too) at each eta over ``draws`` simulated chips. The chips
   are those of seed ``s`` (:func:`evaluate_on_chips` with ``chips=s``, which names each layer's
   chip by its qualified name): within a seed every model meets the very same chips, so a
   difference between two methods on one chip is paired;
   across seeds the chips are new draws, so chips are nested within seeds;
4. writes ``accuracies.csv`` (every accuracy: model, seed, chips, eta, draw, top-1),
   ``tables.md`` (the two tables below) and ``robustness.png``, and prints the tables.

Table 1: top-1 mean ± std per model and eta over all seeds and chips (the std holds both the
seed-to-seed and the chip-to-chip spread). Table 2: for each method, the paired difference to
noise-only, ``mean [95% CI]`` in points of top-1, from :func:`paired_difference`.

A causal LM (``fit_study(..., task="causal_lm")``, token data, or a ``task: causal_lm`` recipe
such as ``licenses-llama``) is measured by perplexity instead (lower is better: a negative
difference to noise-only is a gain), with the same pairing.

On a chip (``hardware=`` with ``times=``, ``--hardware`` / ``--times``, for ``run_study`` and
``fit_study`` alike): every model is also measured on ``draws`` chips of that hardware model per
seed at each time (chips ``s`` again, the same for every model of seed ``s``), in tables 3 and 4
(per time, and the paired differences), ``chip_accuracies.csv`` and ``chip.png``; the hardware
model and the times are saved in ``study.json`` and a resume must give the same.

The interval. A cell's data are ``d[s][k] = acc(method, s, chip k) - acc(noise, s, chip k)``.
The draws within a seed share the seed's two trained models, so they are not independent
replicates: treating the ``S x K`` differences as independent would shrink the interval by up
to ``sqrt(K)``. The seeds are the independent units. The interval is Student's t over the
per-seed means ``m_s = mean_k d[s][k]``: ``mean(m) ± t(0.975, S-1) * sd(m) / sqrt(S)``. For
this balanced nested design it is the classical interval for the grand mean of a one-way
random-effects model (the variance of the grand mean is ``(var_seed + var_chip / K) / S``,
estimated without bias by ``var(m_s) / S``); it is exact when the per-seed means are normal,
and it counts the chip-to-chip spread through the ``m_s``. With 3 seeds the t factor is 4.30,
so intervals are wide: that is the honest price of 3 training runs per method. At eta = 0
there is one clean pass per seed and the interval is over the seeds alone.

Resumable: ``resume=True`` continues a study in its folder (trained runs are kept, an
interrupted run resumes exactly from its ``last.pt``, evaluations already done are read back
from ``OUT/evals``); the settings must be the same. Without it an existing folder is refused:
a study never overwrites (or silently reuses) a folder.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..convert import convert, noisy_layers
from ..robustness import RobustnessResult, evaluate_robustness, plot_results
from ..spec import NoiseSpec
from . import checkpoint as ckpt
from . import runfolder as rf
from .data import build_data, eval_loader
from .models import CLASSIFIER, CONVNETS, build_model
from .recipes import ConfigError, resolve, validate
from .trainer import Trainer, teacher_config

__all__ = ["STUDY_METHODS", "STUDY_ETA_FACTORS", "StudyResult", "run_study", "fit_study",
           "evaluate_on_chips", "chip_identity", "paired_difference", "t_quantile"]

STUDY_METHODS = ("clean", "noise", "kd", "consistency")
BASELINE = "noise"
# default etas: these multiples of the training eta (0 to 1.5x, denser around the training eta)
STUDY_ETA_FACTORS = (0.0, 0.5, 1.0, 1.5)
DEFAULT_DRAWS = 8
STUDY_TIMES = (1.0, 86400.0, 3.15e7)  # on a chip (hardware=): 1 s, 1 day, 1 year after programming
MARKER = "study.json"
STUDY_VERSION = 1


# ----------------------------------------------------------------------------- statistics
def _t_cdf(t: float, df: int) -> float:
    """Student's t CDF by Simpson's rule on the density (smooth, so 2000 panels give ~1e-10)."""
    if t < 0:
        return 1.0 - _t_cdf(-t, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 2000
    h = t / n
    total = 0.0
    for i in range(n + 1):
        x = i * h
        f = math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))
        total += f * (1 if i in (0, n) else 4 if i % 2 else 2)
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def paired_difference(diffs_by_seed: Sequence[Sequence[float]], level: float = 0.95) -> dict:
    """Mean paired difference and its ``level`` confidence interval for a nested design.

    ``diffs_by_seed[s]`` holds the differences of seed ``s`` (one per chip; chips nested within
    seeds). The interval is Student's t over the per-seed means (see the module docstring):
    ``mean ± t((1 + level) / 2, S - 1) * sd(means) / sqrt(S)``. Returns ``{"mean", "low",
    "high", "seeds", "seed_means"}``; with one seed the bounds are NaN (no spread to measure).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    means = []
    for s, d in enumerate(diffs_by_seed):
        d = [float(v) for v in d]
        if not d:
            raise ValueError(f"seed {s} has no differences")
        means.append(sum(d) / len(d))
    if not means:
        raise ValueError("no seeds")
    n = len(means)
    mean = sum(means) / n
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "seeds": n, "seed_means": means}
    sd = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1))
    half = t_quantile((1.0 + level) / 2.0, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "seeds": n, "seed_means": means}


# ----------------------------------------------------------------------------- the same chips
def chip_identity(model) -> tuple:
    """What, besides the chip seed, decides a model's simulated chips: the qualified names of its
    noisy layers. Models with equal identities evaluated with equal ``chips`` meet the same chips."""
    return tuple(name for name, _ in noisy_layers(model))


def evaluate_on_chips(model, loader, etas, draws: int, chips: int, **kwargs) -> RobustnessResult:
    """:func:`fastnoise.evaluate_robustness` on the simulated chips numbered ``chips``.

    The one place the study decides which chips a model meets: ``evaluate_robustness(...,
    seed=chips)``, where draw ``k`` of a layer is a function of (``chips``, the layer's qualified
    name in ``model``, ``k``). So two models with the same :func:`chip_identity` meet the same
    chips for the same ``chips``, however and in whatever order they were built, and the
    process's global noise seed is left alone.
    """
    return evaluate_robustness(model, loader, etas, draws, seed=int(chips), **kwargs)


# ----------------------------------------------------------------------------- the study
@dataclass
class StudyResult:
    """Every accuracy of a study: ``results[(model, seed)]`` is that model's
    :class:`RobustnessResult` on the chips of ``seed`` (``model``: ``teacher`` or a method)."""

    out: str
    etas: list
    seeds: list
    models: list
    draws: int
    results: dict = field(default_factory=dict)
    tables: str = ""
    chip: Optional[StudyResult] = None  # the same models on chips over time (hardware=)

    def values(self, model: str, eta_index: int) -> list:
        """All accuracies of ``model`` at ``etas[eta_index]``, over seeds and chips."""
        return [v for s in self.seeds for v in self.results[(model, s)].accuracies[eta_index]]

    def difference(self, model: str, eta_index: int, baseline: str = BASELINE, level: float = 0.95) -> dict:
        """:func:`paired_difference` of ``model`` against ``baseline`` at ``etas[eta_index]``."""
        diffs = []
        for s in self.seeds:
            a = self.results[(model, s)].accuracies[eta_index]
            b = self.results[(baseline, s)].accuracies[eta_index]
            diffs.append([x - y for x, y in zip(a, b, strict=True)])
        return paired_difference(diffs, level)


def _metric(study: StudyResult) -> str:
    return next(iter(study.results.values())).metric if study.results else "top1"


def _mean_std(values) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _signed(v: float) -> str:
    return f"{v:+.2f}"


def format_tables(study: StudyResult, header: str = "", axis: str = "eta") -> str:
    """Table 1 (mean ± std per model and eta) and table 2 (paired differences to noise-only);
    ``axis`` names the first column (``"t (s)"`` for a study on chips over time)."""
    lines = []
    if header:
        lines += [header, ""]
    lines += [f"| {axis} | " + " | ".join(study.models) + " |", "|---|" + "---|" * len(study.models)]
    for i, e in enumerate(study.etas):
        cells = []
        for m in study.models:
            mean, sd = _mean_std(study.values(m, i))
            cells.append(f"{mean:.2f} ± {sd:.2f}")
        lines.append(f"| {e:g} | " + " | ".join(cells) + " |")
    others = [m for m in study.models if m not in ("teacher", BASELINE)]
    if BASELINE in study.models and others:
        unit = "perplexity, lower is better" if _metric(study) == "perplexity" else "points of top-1"
        lines += ["", f"Paired difference to {BASELINE}-only ({unit}, same seed and same chip): "
                  f"mean [95% CI], t over the {len(study.seeds)} per-seed means", "",
                  f"| {axis} | " + " | ".join(f"{m} - {BASELINE}" for m in others) + " |",
                  "|---|" + "---|" * len(others)]
        for i, e in enumerate(study.etas):
            cells = []
            for m in others:
                d = study.difference(m, i)
                ci = ("[n/a]" if math.isnan(d["low"]) else f"[{_signed(d['low'])}, {_signed(d['high'])}]")
                cells.append(f"{_signed(d['mean'])} {ci}")
            lines.append(f"| {e:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _check_int_list(name: str, values, lo: int = 0) -> list:
    values = list(values)
    if not values:
        raise ConfigError(f"{name} is empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name}: each must be an int >= {lo}, got {v!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} has repeats: {values}")
    return values


def _check_runs(seeds, methods, draws, flag: str) -> tuple[list, list]:
    """The study's seeds, methods and draws checked; ``flag`` prefixes names in messages
    (``--`` for the CLI)."""
    seeds = _check_int_list("seeds", seeds)
    methods = list(methods)
    for m in methods:
        if m not in STUDY_METHODS:
            raise ConfigError(f"unknown study method {m!r}; choose from {list(STUDY_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods has repeats: {methods}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ConfigError(f"{flag}draws must be an int >= 1, got {draws!r}")
    return seeds, methods


def _check_etas(etas, eta: float, flag: str) -> list:
    """The evaluation etas checked (None: :data:`STUDY_ETA_FACTORS` times the training ``eta``)."""
    if etas is None:
        etas = [round(f * eta, 6) for f in STUDY_ETA_FACTORS]
    etas = [float(e) for e in etas]
    for e in etas:
        if not (math.isfinite(e) and e >= 0):
            raise ConfigError(f"{flag}etas: each must be a finite number >= 0, got {e!r}")
    if not etas:
        raise ConfigError(f"{flag}etas is empty")
    return etas


def _settings(cfg, seeds, etas, draws, methods, chip=None) -> dict:
    """What OUT/study.json holds and a resume must match (``chip``: from :func:`_check_chip`)."""
    settings = {"version": STUDY_VERSION, "seeds": seeds, "etas": etas, "draws": draws, "methods": methods,
                "config": cfg}
    if chip is not None:
        settings["hardware"] = {"model": repr(chip[0]), "times": chip[1]}
    return settings


def _check_out(out: str, settings: dict, resume: bool, python: bool = False) -> None:
    """``python``: the errors name fit_study's arguments (``resume=True``, ``out=``), not the CLI's
    flags."""
    another, again = ("another out=", "resume=True") if python else ("another --out", "--resume")
    marker = os.path.join(out, MARKER)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"study folder {out!r} exists and is not a folder")
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    if not os.path.isfile(marker):
        raise ConfigError(f"study folder {out!r} exists and was not written by fastnoise study; "
                          f"choose {another}")
    if not resume:
        raise ConfigError(f"study folder {out!r} already exists; pass {again} to continue it or "
                          f"choose {another}")
    try:
        with open(marker) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{marker} cannot be read ({rf.first_line(e)}): the study's settings are lost; "
                          f"choose {another}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{marker} holds no settings (a {type(saved).__name__}); choose {another}")
    now = json.loads(json.dumps(settings))  # tuples -> lists, as saved
    for key in ("version", "seeds", "etas", "draws", "methods", "config", "hardware"):
        if saved.get(key) != now.get(key):
            raise ConfigError(f"cannot resume study {out!r} with other settings: its {key} differ "
                              f"({MARKER} has {saved.get(key)!r}, now {now.get(key)!r})")
    if "given" in saved and "given" in now:  # fit_study: the same model, teacher and data
        _check_given(out, saved["given"], now["given"])


def _write_marker(out: str, settings: dict) -> None:
    """``OUT/study.json``, atomically (rewritten at every start: a kill leaves the old one whole)."""
    rf.write_text(os.path.join(out, MARKER), json.dumps(settings, indent=1))


def _state_layout(module: torch.nn.Module) -> list:
    """[name, shape, dtype] of each entry of a module's state: its structure, not its values."""
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in module.state_dict().items()]


def _state_digest(module: torch.nn.Module) -> str:
    """A digest of a module's state values (bytes on the CPU), for a model that is given as is."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _data_size(data) -> Optional[int]:
    dataset = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
    try:
        return len(dataset)
    except TypeError:
        return None


def _given(model: torch.nn.Module, model_is_copied: bool, teacher, train_data, val_data) -> dict:
    """What a resumed fit_study must be given again, as saved in its marker: the students'
    model (its structure; its values too when every student copies it), the given teacher's
    values, and the sizes of the training and validation data (not their contents: a dataset's
    items may be drawn at random)."""
    return {"model": _state_layout(model), "model_values": _state_digest(model) if model_is_copied else None,
            "teacher": _state_digest(teacher) if teacher is not None else None,
            "train_size": _data_size(train_data), "val_size": _data_size(val_data)}


def _check_given(out: str, saved: dict, now: dict) -> None:
    start = f"cannot resume study {out!r}: "
    if saved["model"] != now["model"]:
        first = next(((n, o) for n, o in zip(now["model"], saved["model"], strict=False) if n != o), None)
        what = (f"{first[0]} now, {first[1]} in {MARKER}" if first else
                f"{len(now['model'])} entries now, {len(saved['model'])} in {MARKER}")
        raise ConfigError(start + f"the model is not the study's (its state: {what}); give the same "
                          "model or builder")
    if saved["model_values"] != now["model_values"]:
        raise ConfigError(start + "the model to copy holds other weights than the study's; give the "
                          "same model")
    if saved["teacher"] != now["teacher"]:
        raise ConfigError(start + "the teacher is not the study's (other weights); give the same teacher")
    for key, what in (("train_size", "training"), ("val_size", "validation")):
        if saved[key] != now[key]:
            raise ConfigError(start + f"the {what} data has {now[key]} samples, the study's had "
                              f"{saved[key]}; give the same data")


def _train(cfg: dict, run_dir: str, progress: bool, device, log) -> None:
    """Train ``cfg`` in ``run_dir`` unless it is finished; resume it if it was interrupted."""
    if os.path.isfile(os.path.join(run_dir, "model.pth")):
        return
    started = (os.path.isfile(os.path.join(run_dir, "last.pt"))
               or os.path.isfile(os.path.join(run_dir, "teacher", "config.yaml")))
    Trainer(cfg, run_dir, resume=started, overwrite=not started, progress=progress, device=device,
            log=log).fit()


def _load_model(cfg: dict, weights: str, num_classes: int, device) -> tuple[torch.nn.Module, bool]:
    """The trained model as the Trainer built it (its architecture, weights and the run's noise
    spec), and whether it runs channels_last (as the Trainer decides it)."""
    arch = cfg["model"]["arch"]
    with torch.random.fork_rng(devices=[]):
        model = build_model(arch, num_classes)
    ckpt.load_weights(model, weights, "weights", arch, CLASSIFIER[arch], num_classes)
    n = cfg["noise"]
    convert(model, NoiseSpec(eta=n["eta"], scale=n["scale"], noise_bias=n["noise_bias"]),
            exclude=n["exclude"] or None)
    cl = cfg["model"]["channels_last"]
    cl = (device.type == "cuda" and arch in CONVNETS) if cl == "auto" else bool(cl)
    fmt = torch.channels_last if cl else torch.contiguous_format
    return model.to(device, memory_format=fmt), cl


def _device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _amp_dtype(cfg: dict, dev: torch.device) -> Optional[torch.dtype]:
    amp = cfg["amp"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp == "auto" and dev.type == "cuda":
        dtype = torch.bfloat16
    return dtype


def _measure(study: StudyResult, load: Callable, loader, dtype, dev, progress: bool, step: Callable,
             task: Optional[str] = None, chip=None) -> None:
    """Every model of ``study`` on the chips of each seed (``load(name, seed)`` gives the model
    and whether it runs channels_last); results already in ``OUT/evals`` are read back.
    ``chip``: ``(hardware model, times)``: on those chips at those times (``study.etas`` holds
    the times) instead of Gaussian noise."""
    # the validation set is read once and kept as batches (it has no augmentation): the
    # evaluation makes 1 + draws x etas passes over it per model and seed
    loader = list(loader)
    out, etas, draws = study.out, study.etas, study.draws
    for s in study.seeds:
        identity = None
        for name in study.models:
            suffix = "" if chip is None else f"-{chip[0].name}"
            cache = os.path.join(out, "evals", f"{name}-seed{s}{suffix}.json")
            model, cl = load(name, s)
            if name != "teacher":  # the students are compared pairwise: same chips or no table
                ident = chip_identity(model)
                if identity is None:
                    identity = ident
                elif ident != identity:
                    raise RuntimeError(f"study: {name} (seed {s}) has other noisy layers "
                                       "than the other students, so it would not meet the same chips")
            if os.path.isfile(cache):
                with open(cache) as f:
                    saved = json.load(f)
                result = RobustnessResult(saved["etas"], saved["accuracies"], name=name,
                                          scale=saved["scale"], samples=saved["samples"],
                                          extra=saved.get("extra", {}), metric=saved.get("metric", "top1"))
            else:
                on = {} if chip is None else {"hardware": chip[0], "times": etas}
                result = evaluate_on_chips(model, loader, None if chip else etas, draws, chips=s,
                                           device=dev, autocast_dtype=dtype, name=f"{name} seed {s}",
                                           progress=progress, channels_last=cl, task=task, **on)
                result.name = name
                rf.write_text(cache, json.dumps({"etas": result.etas, "accuracies": result.accuracies,
                                                 "scale": result.scale, "samples": result.samples,
                                                 "extra": result.extra, "metric": result.metric}))
            study.results[(name, s)] = result
        step(f"evaluated seed {s}")


def _measure_all(study: StudyResult, load: Callable, loader, dtype, dev, progress: bool, step: Callable,
                 task: Optional[str] = None, chip=None) -> None:
    """:func:`_measure` under Gaussian noise, and with ``chip`` (from :func:`_check_chip`) the same
    models on those chips at those times into ``study.chip``."""
    loader = list(loader)
    _measure(study, load, loader, dtype, dev, progress, step, task=task)
    if chip is not None:
        study.chip = StudyResult(study.out, chip[1], study.seeds, study.models, study.draws)
        _measure(study.chip, load, loader, dtype, dev, progress, step, task=task, chip=chip)


def run_study(recipe: str, *, seeds: Sequence[int] = (0, 1, 2), etas: Optional[Sequence[float]] = None,
              draws: int = DEFAULT_DRAWS, out: Optional[str] = None, methods: Sequence[str] = STUDY_METHODS,
              overrides: Sequence[str] = (), data_root: Optional[str] = None, resume: bool = False,
              progress: bool = True, device=None, log: Callable[[str], None] = print,
              hardware=None, times: Optional[Sequence[float]] = None) -> StudyResult:
    """Run (or with ``resume=True`` continue) a study; see the module docstring.

    Args:
        recipe: a shipped recipe name or a YAML file; ``overrides`` (``key=value``) and
            ``data_root`` (``data.root``) apply on top. Its ``method.name`` is ignored.
        seeds: training seeds of the students (>= 2 for an interval; 3 or more recommended).
        etas: evaluation noise levels (default :data:`STUDY_ETA_FACTORS` times ``noise.eta``).
        draws: simulated chips per seed and nonzero eta.
        out: the study folder (default ``runs/study-NAME``).
        methods: the students' methods (``noise`` is the baseline of the differences).
        hardware: also measure every model on chips of this hardware model
            (``fastnoise.PCM()`` or ``"pcm"``), the same chips for every model of a seed:
            tables 3 and 4, and ``chip_accuracies.csv`` / ``chip.png``.
        times: the times on ``hardware`` (s after programming; default 1 s, 1 day, 1 year).
    Returns a :class:`StudyResult`; its ``tables`` is what was printed and written (its
    ``chip`` the :class:`StudyResult` on chips, or None).
    """
    cfg = resolve(recipe, overrides, data_root)
    seeds, methods = _check_runs(seeds, methods, draws, "--")
    eta = float(cfg["noise"]["eta"])
    etas = _check_etas(etas, eta, "--")
    chip = _check_chip(hardware, times, "--")
    t = cfg["teacher"]
    if t["weights"] is None and t["epochs"] == 0:
        raise ConfigError("the study needs a teacher: set teacher.epochs=N (trained first, once) or "
                          "teacher.weights=FILE")
    if "consistency" in methods and not cfg["method"]["layers"]:
        raise ConfigError("method.layers is empty: the consistency students need the module names "
                          "whose outputs they compare (e.g. method.layers=[conv1,fc1])")
    out = out or os.path.join("runs", f"study-{cfg['name']}")
    settings = _settings(cfg, seeds, etas, draws, methods, chip)
    _check_out(out, settings, resume)
    data = build_data(cfg)  # checked before anything is written (the Trainers check it again)

    os.makedirs(out, exist_ok=True)
    _write_marker(out, settings)
    os.makedirs(os.path.join(out, "evals"), exist_ok=True)

    quiet_eval = {"etas": [], "epoch_draws": cfg["eval"]["epoch_draws"], "draws": cfg["eval"]["draws"]}
    if t["weights"] is None:
        tcfg = teacher_config(cfg)
        tcfg["eval"] = dict(quiet_eval)
        teacher_dir = os.path.join(out, "teacher")
        teacher_file = os.path.abspath(os.path.join(teacher_dir, "model.pth"))
    else:
        tcfg, teacher_dir = None, None
        teacher_file = os.path.abspath(os.path.expanduser(str(t["weights"])))
    students = []
    for s in seeds:
        for m in methods:
            scfg = copy.deepcopy(cfg)
            scfg["name"] = f"{cfg['name']}-{m}-seed{s}"
            scfg["seed"] = s
            scfg["method"]["name"] = m
            scfg["teacher"].update({"weights": teacher_file, "epochs": 0})
            scfg["eval"] = dict(quiet_eval)
            students.append((m, s, scfg, os.path.join(out, f"seed{s}", m)))

    bar = None
    if progress:
        from ..progress import progress_bar

        bar = progress_bar((tcfg is not None) + len(students) + len(seeds) * (1 + (chip is not None)),
                           "study", every=1)
    say = bar.write if bar is not None and log is print else log

    def step(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update(1)

    try:
        if tcfg is not None:
            say(f"[study] clean teacher: {tcfg['model']['arch']}, {tcfg['schedule']['epochs']} epochs "
                f"in {teacher_dir}")
            _train(tcfg, teacher_dir, progress, device, say)
            step("teacher")
        for m, s, scfg, run_dir in students:
            say(f"[study] seed {s}: student '{m}' (eta={eta:g}, {scfg['noise']['scale']}) in {run_dir}")
            _train(scfg, run_dir, progress, device, say)
            step(f"seed {s} {m}")

        # every model on the chips of each seed
        dev = _device(device)
        loader = eval_loader(data.val, cfg["data"]["eval_batch_size"], cfg["data"]["workers"],
                             dev.type == "cuda")
        teacher_cfg = copy.deepcopy(cfg)
        teacher_cfg["model"]["arch"] = cfg["teacher"]["arch"] or cfg["model"]["arch"]
        runs = {("teacher", s): (teacher_cfg, teacher_file) for s in seeds}
        runs.update({(m, s): (scfg, os.path.join(run_dir, "model.pth")) for m, s, scfg, run_dir in students})

        def load(name: str, s: int):
            mcfg, weights = runs[(name, s)]
            return _load_model(mcfg, weights, data.num_classes, dev)

        study = StudyResult(out, etas, seeds, ["teacher", *methods], draws)
        _measure_all(study, load, loader, _amp_dtype(cfg, dev), dev, progress, step, task=cfg["task"],
                     chip=chip)
    finally:
        if bar is not None:
            bar.close()

    header = (f"{cfg['name']}: {_measured(study, cfg['task'])} of {cfg['data']['dataset']}, "
              f"{cfg['model']['arch']}; students trained at eta={eta:g} ({cfg['noise']['scale']} scale) "
              f"from one clean teacher; mean ± std over {len(seeds)} seeds x {draws} chips per seed "
              f"(seeds {', '.join(map(str, seeds))})")
    return _finish(study, header, cfg, out, log)


def _measured(study: StudyResult, task: Optional[str]) -> str:
    """What the tables hold: ``top-1 (%) on N held-out samples`` or a causal LM's perplexity."""
    samples = study.results[("teacher", study.seeds[0])].samples
    if task == "causal_lm":
        return f"perplexity on {samples} held-out tokens"
    return f"top-1 (%) on {samples} held-out samples"


def _finish(study: StudyResult, header: str, cfg: dict, out: str, log) -> StudyResult:
    """The tables under ``header``: into the result, OUT/accuracies.csv, OUT/tables.md and ``log``."""
    study.tables = format_tables(study, header)
    _write_outputs(study, cfg, os.path.join(out, "accuracies.csv"))
    if study.chip is not None:
        hw = study.chip.results[("teacher", study.seeds[0])].extra.get("hardware", "chip")
        what = "perplexity" if _metric(study.chip) == "perplexity" else "top-1 (%)"
        study.tables += "\n\n" + format_tables(
            study.chip, f"The same models on {hw} chips over time (same chips for every model of a "
            f"seed; {study.chip.draws} chips per seed): {what} at t seconds after programming",
            axis="t (s)")
        _write_chip_outputs(study.chip, cfg, hw)
    rf.write_text(os.path.join(out, "tables.md"), study.tables + "\n")
    log(study.tables)
    return study


def _write_outputs(study: StudyResult, cfg: dict, csv_path: str) -> None:
    with rf.atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "seed", "chips", "eta", "draw", "perplexity" if _metric(study) == "perplexity"
                    else "top1"])
        for (name, s), r in study.results.items():
            for e, accs in zip(r.etas, r.accuracies, strict=True):
                for k, a in enumerate(accs):
                    w.writerow([name, s, s, e, k if e > 0 else "", a])
    pooled = {m: RobustnessResult(study.etas, [study.values(m, i) for i in range(len(study.etas))], name=m,
                                  scale=cfg["noise"]["scale"], metric=_metric(study)) for m in study.models}
    with rf.atomic_path(os.path.join(study.out, "robustness.png")) as tmp:
        plot_results(pooled, tmp, title=f"{cfg['name']}: trained at eta={cfg['noise']['eta']:g}, "
                                        f"{len(study.seeds)} seeds x {study.draws} chips")


def _check_chip(hardware, times, flag: str):
    """(hardware model, times) of a study on chips, None without ``hardware``."""
    from ..hardware import by_name
    from ..hardware.base import HardwareModel, check_time

    if hardware is None:
        if times is not None:
            raise ConfigError(f"{flag}times are times on a chip: give {flag}hardware too (e.g. pcm)")
        return None
    try:
        hw = by_name(hardware) if isinstance(hardware, str) else hardware
        if not isinstance(hw, HardwareModel):
            raise ConfigError(f"{flag}hardware must be a hardware model or its name, got {hardware!r}")
        times = list(STUDY_TIMES if times is None else times)
        if not times:
            raise ConfigError(f"{flag}times is empty")
        return hw, [check_time(t) for t in times]
    except ValueError as e:
        raise ConfigError(f"{flag}hardware/{flag}times: {e}") from None


def _write_chip_outputs(study: StudyResult, cfg: dict, hw: str) -> None:
    with rf.atomic_path(os.path.join(study.out, "chip_accuracies.csv")) as tmp, \
            open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "seed", "chips", "t", "draw", _metric(study)])
        for (name, s), r in study.results.items():
            for t, accs in zip(r.etas, r.accuracies, strict=True):
                for k, a in enumerate(accs):
                    w.writerow([name, s, s, t, k, a])
    pooled = {m: RobustnessResult(study.etas, [study.values(m, i) for i in range(len(study.etas))], name=m,
                                  extra={"axis": "t", "hardware": hw}, metric=_metric(study))
              for m in study.models}
    with rf.atomic_path(os.path.join(study.out, "chip.png")) as tmp:
        plot_results(pooled, tmp, title=f"{cfg['name']} on {hw} chips: {len(study.seeds)} seeds x "
                                        f"{study.draws} chips")


# ----------------------------------------------------------------------------- the user's models
def fit_study(model, train_data, val_data, *, teacher: Optional[torch.nn.Module] = None,
              teacher_epochs: int = 0, seeds: Sequence[int] = (0, 1, 2),
              etas: Optional[Sequence[float]] = None, draws: int = DEFAULT_DRAWS,
              out: str = "runs/study-fit", methods: Sequence[str] = STUDY_METHODS,
              method: Optional[dict] = None, spec: Optional[NoiseSpec] = None, epochs: int = 10,
              batch_size: Optional[int] = None, resume: bool = False, device=None,
              messages: Callable[[str], None] = print, task: Optional[str] = None,
              hardware=None, times: Optional[Sequence[float]] = None, **settings) -> StudyResult:
    """The study of :func:`run_study` on the user's own model and data, every run through
    :func:`fastnoise.train.fit`.

    Args:
        model: a builder (a callable with no arguments that returns a fresh ``nn.Module``,
            called under ``torch.manual_seed(seed)`` for each student, so the seeds also vary
            the initial weights), or an ``nn.Module`` that every student starts from (a deep
            copy each; the seeds then vary only the data order and the training noise). It must
            not hold noisy layers (they are made with ``spec``).
        train_data: a map-style dataset (or a ``DataLoader``), as :func:`fit` takes it.
        val_data: the same, for the evaluation.
        teacher: the trained clean teacher of the ``kd`` students (not modified), or None: a
            clean teacher is trained first, ``teacher_epochs`` epochs (from the builder under
            seed 0, or a copy of ``model``), in ``OUT/teacher``.
        seeds: as :func:`run_study`.
        etas: as :func:`run_study` (default: 0, 0.5, 1 and 1.5 times the training eta).
        draws: as :func:`run_study`.
        methods: as :func:`run_study`.
        method: the method settings every student shares (the recipe's ``method`` section
            without ``name``: ``{"layers": ["layer1"], "temperature": 6.0}``); consistency
            needs ``layers``.
        spec: as :func:`fit`.
        epochs: as :func:`fit`.
        batch_size: as :func:`fit`.
        device: as :func:`fit`.
        messages: as :func:`fit`.
        task: as :func:`fit`; a causal LM's study measures perplexity (lower is better).
        hardware: as :func:`run_study`: also measure every model (teacher and students) on chips
            of this hardware model (``fastnoise.PCM()`` or ``"pcm"``), the same chips for every
            model of a seed; the chip tables join ``tables``, with ``chip_accuracies.csv`` and
            ``chip.png``, and the result's ``chip`` holds them.
        times: the times on ``hardware`` (s after programming; default 1 s, 1 day, 1 year).
        **settings: as :func:`fit`, without ``seed`` (the study sets it).
        out: the study folder; ``resume=True`` continues one: the same model, teacher, data
            and settings must be given again. Checked: the settings, the model's structure
            (its state's names, shapes and dtypes; its values too for a model to copy), a given
            teacher's values, and the sizes of both datasets (their contents are not: items may
            be drawn at random).
    Returns a :class:`StudyResult` (its ``tables`` were printed through ``messages``).
    """
    from .fitting import fit, fit_config, resolve_task

    if not (callable(model) or isinstance(model, torch.nn.Module)):
        raise ConfigError(f"model must be an nn.Module or a callable that builds one, got "
                          f"{type(model).__name__}")
    if "seed" in settings:
        raise ConfigError("seed is set by the study for each student (seeds=...)")
    method = dict(method or {})
    if "name" in method:
        raise ConfigError("method is the students' shared method settings; their names are methods=...")
    seeds, methods = _check_runs(seeds, methods, draws, "")
    if isinstance(teacher_epochs, bool) or not isinstance(teacher_epochs, int) or teacher_epochs < 0:
        raise ConfigError(f"teacher_epochs must be an int >= 0, got {teacher_epochs!r}")
    if teacher is None and teacher_epochs == 0:
        raise ConfigError("the study needs a teacher: pass teacher=MODEL (trained) or teacher_epochs=N")
    if teacher is not None and not isinstance(teacher, torch.nn.Module):
        raise ConfigError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    base_settings = dict(settings)
    base_settings["eval"] = {**settings.get("eval", {}), "etas": []}  # the study measures them all
    cfg = fit_config({"name": "noise", **method}, spec, epochs, batch_size, "auto", base_settings)
    task = resolve_task(task, train_data, val_data)
    cfg["task"] = task
    validate(copy.deepcopy(cfg))  # every setting holds before anything is written
    if "consistency" in methods and not cfg["method"]["layers"]:
        raise ConfigError("method has no layers: the consistency students need the module names whose "
                          "outputs they compare (method={'layers': [...]})")
    eta = float(cfg["noise"]["eta"])
    etas = _check_etas(etas, eta, "")
    chip = _check_chip(hardware, times, "")
    spec = NoiseSpec(eta=eta, scale=cfg["noise"]["scale"], noise_bias=cfg["noise"]["noise_bias"])
    exclude = cfg["noise"]["exclude"] or None

    def fresh(seed: int) -> torch.nn.Module:
        if isinstance(model, torch.nn.Module):
            m = copy.deepcopy(model)
        else:
            torch.manual_seed(seed)
            m = model()
            if not isinstance(m, torch.nn.Module):
                raise ConfigError(f"the model builder returned a {type(m).__name__}, not an nn.Module")
        if noisy_layers(m):
            raise ConfigError("the model already has noisy layers: give the study a clean model (the "
                              "students are converted with spec)")
        return m

    study_settings = _settings(cfg, seeds, etas, draws, methods, chip)
    study_settings["teacher"] = "given" if teacher is not None else {"epochs": teacher_epochs}
    study_settings["given"] = _given(fresh(seeds[0]), isinstance(model, torch.nn.Module), teacher,
                                     train_data, val_data)
    _check_out(out, study_settings, resume, python=True)

    def trained(seed: int, run_dir: str, noisy: bool = True) -> torch.nn.Module:
        """The model a run trained, from its model.pth (noisy layers keep torch's keys)."""
        m = fresh(seed)
        if noisy:
            convert(m, spec, exclude=exclude)
        path = os.path.join(run_dir, "model.pth")
        m.load_state_dict(ckpt.model_state_from(ckpt.load_file(path, "weights"), path, "weights"))
        return m

    # the noise is spec's (spec and the noise settings were merged into cfg above)
    run_settings = dict(base_settings)
    if "noise" in run_settings:
        run_settings["noise"] = {k: v for k, v in run_settings["noise"].items()
                                 if k not in ("eta", "scale", "noise_bias")}

    def train(seed: int, run_dir: str, **kw) -> None:
        if os.path.isfile(os.path.join(run_dir, "model.pth")):
            return
        started = os.path.isfile(os.path.join(run_dir, "last.pt"))
        fit(fresh(seed), train_data, val_data, out_dir=run_dir, resume=started, overwrite=not started,
            spec=spec, epochs=epochs, batch_size=batch_size, device=device, messages=messages, seed=seed,
            task=task, **kw, **run_settings)

    os.makedirs(os.path.join(out, "evals"), exist_ok=True)
    _write_marker(out, study_settings)
    if teacher is None:
        teacher_dir = os.path.join(out, "teacher")
        messages(f"[study] clean teacher: {teacher_epochs} epochs in {teacher_dir}")
        if not os.path.isfile(os.path.join(teacher_dir, "model.pth")):
            started = os.path.isfile(os.path.join(teacher_dir, "last.pt"))
            fit(fresh(0), train_data, val_data, method="clean", out_dir=teacher_dir, resume=started,
                overwrite=not started, spec=spec, epochs=teacher_epochs, batch_size=batch_size,
                device=device, messages=messages, seed=0, task=task, **run_settings)
        teacher = trained(0, teacher_dir, noisy=False)  # a plain clean model, as a given teacher is
    for s in seeds:
        for m in methods:
            run_dir = os.path.join(out, f"seed{s}", m)
            messages(f"[study] seed {s}: student '{m}' (eta={eta:g}) in {run_dir}")
            train(s, run_dir, method={"name": m, **method}, teacher=teacher if m == "kd" else None)

    dev = _device(device)
    if isinstance(val_data, torch.utils.data.DataLoader):
        loader = val_data
    else:
        loader = eval_loader(val_data, cfg["data"]["eval_batch_size"], cfg["data"]["workers"],
                             dev.type == "cuda")
    chip_teacher = copy.deepcopy(teacher)
    if not noisy_layers(chip_teacher):
        convert(chip_teacher, spec, exclude=exclude)

    def load(name: str, s: int):
        m = chip_teacher if name == "teacher" else trained(s, os.path.join(out, f"seed{s}", name))
        cl = cfg["model"]["channels_last"]
        convnet = any(isinstance(x, torch.nn.Conv2d) for x in m.modules())
        cl = (dev.type == "cuda" and convnet) if cl == "auto" else bool(cl)
        return m.to(dev, memory_format=torch.channels_last if cl else torch.contiguous_format), cl

    study = StudyResult(out, etas, seeds, ["teacher", *methods], draws)
    _measure_all(study, load, loader, _amp_dtype(cfg, dev), dev, False, lambda msg: None, task=task,
                 chip=chip)
    header = (f"{cfg['name']}: {_measured(study, task)}; students trained at "
              f"eta={eta:g} ({cfg['noise']['scale']} scale) from one clean teacher; mean ± std over "
              f"{len(seeds)} seeds x {draws} chips per seed (seeds {', '.join(map(str, seeds))})")
    return _finish(study, header, cfg, out, messages)
