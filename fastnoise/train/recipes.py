"""Run configurations: defaults, YAML recipes shipped in the package, command-line overrides.

A configuration is a nested dict. :data:`DEFAULTS` lists every key a run understands; a recipe
(``fastnoise/train/recipes/NAME.yaml``, or any YAML file) sets some of them, and overrides
``key=value`` with dotted keys (``optim.lr=0.1``, ``noise.exclude=[fc]``) set more, each value
typed by YAML parsing. A key that :data:`DEFAULTS` does not list is an error naming it.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from importlib import resources

import yaml

from .errors import ConfigError

__all__ = ["ConfigError", "DEFAULTS", "METHODS", "list_recipes", "load_recipe", "apply_overrides",
           "validate", "resolve", "load_config_file", "recipe_path", "setting_keys", "unknown_key"]


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` as a string; read it as a float, as YAML 1.2 and Python do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


METHODS = ("clean", "noise", "kd", "consistency")

DEFAULTS: dict = {
    "name": "run",
    "seed": 0,
    "task": "classification",    # classification | causal_lm (fit's given models: fastnoise.train.lm)
    "data": {
        "dataset": "digits",     # digits | fashion_mnist | cifar10 | imagefolder | package.module:function
        "root": None,            # local folder (cifar10, imagefolder; fashion_mnist: Debian's if unset)
        "num_classes": None,     # None: take the data's; else it must agree with the data
        "image_size": None,      # imagefolder: training crop and validation crop (224)
        "val_resize": None,      # imagefolder: shorter side before the centre crop (size*256/224)
        "augment": True,
        "batch_size": 128,       # the global batch, split across processes
        "eval_batch_size": 256,  # per process
        "workers": 0,
        "skip_unreadable": False,  # imagefolder: skip (and report) image files that cannot be read
    },
    "model": {
        "arch": "digits_cnn",    # a built-in (models.ARCHS) or package.module:function (num_classes)
        "init": None,            # None (fresh), "teacher" (the teacher's weights) or a file path
        "channels_last": "auto",  # auto: on CUDA for convnets
    },
    "teacher": {
        "arch": None,            # None: model.arch
        "weights": None,         # a state_dict file (torchvision layout for resnet50)
        "epochs": 0,             # weights None and epochs > 0: train a clean teacher first
        "lr": None,              # the teacher run's optim.lr (None: optim.lr)
    },
    "method": {
        "name": "kd",            # clean | noise | kd | consistency
        # the defaults of losses.py, where the measurements behind them are written down
        "temperature": 6.0,      # kd (losses.DEFAULT_TEMPERATURE)
        "alpha": 0.9,            # kd: weight of the distillation term (losses.DEFAULT_ALPHA)
        "lambda": 1.0,           # consistency: weight of the feature distance (losses.DEFAULT_LAMBDA)
        "layers": [],            # consistency: module names whose outputs are compared
        "distance": "cosine",    # consistency: cosine | mse (losses.DEFAULT_DISTANCE; mse diverged on
                                 # Fashion-MNIST)
        "label_smoothing": 0.0,
        "top_k": None,           # kd of a causal LM: distil from the teacher's k largest logits per token
    },
    "noise": {
        "eta": 0.06,
        "scale": "range",
        "noise_bias": False,
        "exclude": [],           # module-name globs left clean (fastnoise.convert's exclude)
    },
    "optim": {
        "name": "sgd",           # sgd | adamw
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5e-4,
        "betas": [0.9, 0.999],
    },
    "schedule": {
        "epochs": 10,
        "warmup_epochs": 0.0,    # linear warmup from 0, counted in (fractional) epochs
        "min_lr": 0.0,           # cosine decays to this
    },
    "amp": "auto",               # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    "eval": {
        "epoch_draws": 1,        # noisy validation each epoch at the training eta, this many chips
        "etas": [0.0, 0.02, 0.04, 0.06, 0.08, 0.1],  # robustness table after training
        "draws": 20,
    },
    "log": {"every": 10, "progress": True},
    "checkpoint": {"every_steps": 0, "best": True},
}


# ----------------------------------------------------------------------------- loading
def _recipe_dir():
    return resources.files("fastnoise.train").joinpath("recipes")


def list_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def recipe_path(name_or_path: str) -> str:
    """The file of a shipped recipe (by name) or the YAML file given (by path)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    entry = _recipe_dir().joinpath(f"{name_or_path}.yaml")
    if not entry.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}; shipped recipes: "
                          f"{', '.join(list_recipes())} (or give a YAML file path)")
    return str(entry)


def setting_keys(cfg: dict = DEFAULTS, where: str = "") -> list[str]:
    """Every dotted key of a configuration (``schedule.epochs``, ...), in order."""
    keys = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            keys += setting_keys(value, f"{where}{key}.")
        else:
            keys.append(f"{where}{key}")
    return keys


def unknown_key(name: str) -> ConfigError:
    """The error of a key :data:`DEFAULTS` does not list, with the close ones it does list
    (by the whole dotted name, and by its last part: ``epochs`` -> ``schedule.epochs``)."""
    keys = setting_keys()
    close = difflib.get_close_matches(name, keys, n=3, cutoff=0.6)
    leaf = name.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys if "." in k}
    for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75):
        if by_leaf[m] not in close:
            close.append(by_leaf[m])
    hint = f"; did you mean {' or '.join(close[:3])}?" if close else ""
    return ConfigError(f"unknown configuration key {name!r}{hint} (every key and its default: "
                       "`fastnoise recipes NAME`, docs/cli.md)")


def load_config_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = parse_yaml(f.read())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file ({e})") from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a configuration must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, update: dict, where: str = "") -> None:
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in base:
            raise unknown_key(name)
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{name!r} is a section; give its keys ({name}.KEY=...), got {value!r}")
            _merge(base[key], value, name + ".")
        else:
            base[key] = value


def load_recipe(name_or_path: str) -> dict:
    """:data:`DEFAULTS` updated by a shipped recipe (by name) or a YAML file (by path)."""
    if os.path.isfile(name_or_path):
        data = load_config_file(name_or_path)
    else:
        recipe_path(name_or_path)  # an unknown name is an error listing the shipped ones
        data = parse_yaml(_recipe_dir().joinpath(f"{name_or_path}.yaml").read_text())
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, data)
    return cfg


def apply_overrides(cfg: dict, overrides) -> dict:
    """``cfg`` with each ``"a.b=value"`` applied (value parsed as YAML); returns a new dict."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node, path = cfg, ""
        for p in parts[:-1]:
            path = f"{path}{p}"
            if not isinstance(node.get(p), dict):
                raise unknown_key(key.strip())
            node = node[p]
            path += "."
        last = parts[-1]
        if last not in node:
            raise unknown_key(key.strip())
        if isinstance(node[last], dict):
            raise ConfigError(f"{key.strip()!r} is a section; set one of its keys")
        try:
            node[last] = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    return cfg


# ----------------------------------------------------------------------------- validation
def _num(cfg, key, lo=None, hi=None, integer=False, allow_none=False, lo_open=False):
    node = cfg
    for p in key.split("."):
        node = node[p]
    v = node
    if v is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or (isinstance(v, float) and not math.isfinite(v)):
        kind = "an int" if integer else "a finite number"
        raise ConfigError(f"{key} must be {kind}, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ConfigError(f"{key} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and v > hi:
        raise ConfigError(f"{key} must be <= {hi}, got {v!r}")


def _choice(cfg, key, options):
    node = cfg
    for p in key.split("."):
        node = node[p]
    # 1 == True in Python: a number is not a yes/no
    numeric = isinstance(node, (int, float)) and not isinstance(node, bool)
    if node not in options or (numeric and any(isinstance(o, bool) for o in options)):
        raise ConfigError(f"{key} must be one of {list(options)}, got {node!r}")


def _name_or_import(cfg, key, options, probe: bool = False, given_ok: bool = False):
    """A built-in name, or an import path ``package.module:function`` (imported now, so a typo
    fails before any run folder is written; a model builder is also called once on the meta
    device to check that it returns an ``nn.Module``). ``given_ok``: null is allowed too, for a
    run whose model or data were given in Python (:func:`fastnoise.train.fit`)."""
    from .importpath import import_object, is_import_path

    node = cfg
    for p in key.split("."):
        node = node[p]
    if node is None and given_ok:
        return
    if not is_import_path(node):
        if node not in options:
            raise ConfigError(f"{key} must be one of {list(options)} or an import path "
                              f"package.module:function, got {node!r}")
        return
    import_object(node, key)
    if probe:
        from .models import probe_import_arch

        probe_import_arch(node)


def validate(cfg: dict) -> dict:
    """Check types and ranges; raises :class:`ConfigError` naming the key. Returns ``cfg``."""
    from ..spec import SCALES
    from .data import _BUILDERS
    from .losses import DISTANCES
    from .models import ARCHS

    _num(cfg, "seed", 0, integer=True)
    _choice(cfg, "task", ["classification", "causal_lm"])
    _check_task_fits(cfg)
    _num(cfg, "method.top_k", 1, integer=True, allow_none=True)
    if cfg["method"]["top_k"] is not None and cfg["task"] != "causal_lm":
        raise ConfigError("method.top_k is for causal LMs (the teacher's top-k logits per token)")
    if cfg["method"]["label_smoothing"] and cfg["task"] == "causal_lm":
        raise ConfigError("method.label_smoothing is for classifiers: leave it 0 for a causal LM")
    _name_or_import(cfg, "data.dataset", sorted(_BUILDERS), given_ok=True)
    _num(cfg, "data.num_classes", 2, integer=True, allow_none=True)
    _num(cfg, "data.image_size", 8, integer=True, allow_none=True)
    _num(cfg, "data.val_resize", 8, integer=True, allow_none=True)
    _num(cfg, "data.batch_size", 1, integer=True)
    _num(cfg, "data.eval_batch_size", 1, integer=True)
    _num(cfg, "data.workers", 0, integer=True)
    _name_or_import(cfg, "model.arch", sorted(ARCHS), probe=True, given_ok=True)
    if cfg["teacher"]["arch"] is not None:
        _name_or_import(cfg, "teacher.arch", sorted(ARCHS), probe=True)
    _choice(cfg, "model.channels_last", ["auto", True, False])
    _num(cfg, "teacher.epochs", 0, integer=True)
    _num(cfg, "teacher.lr", 0, allow_none=True, lo_open=True)
    _choice(cfg, "method.name", METHODS)
    _num(cfg, "method.temperature", 0, lo_open=True)
    _num(cfg, "method.alpha", 0, 1)
    _num(cfg, "method.lambda", 0)
    _num(cfg, "method.label_smoothing", 0, 1)
    _choice(cfg, "method.distance", DISTANCES)
    layers = cfg["method"]["layers"]
    if not isinstance(layers, list) or not all(isinstance(s, str) for s in layers):
        raise ConfigError(f"method.layers must be a list of module names, got {layers!r}")
    if cfg["method"]["name"] == "consistency" and not layers:
        raise ConfigError("method.layers is empty: consistency needs the module names whose outputs "
                          "it compares (e.g. method.layers=[layer1,layer2])")
    _num(cfg, "noise.eta", 0)
    _choice(cfg, "noise.scale", SCALES)
    _choice(cfg, "noise.noise_bias", [True, False])
    exclude = cfg["noise"]["exclude"]
    if not isinstance(exclude, list) or not all(isinstance(s, str) for s in exclude):
        raise ConfigError(f"noise.exclude must be a list of module-name globs, got {exclude!r}")
    _choice(cfg, "optim.name", ["sgd", "adamw"])
    _num(cfg, "optim.lr", 0, lo_open=True)
    _num(cfg, "optim.momentum", 0, 1)
    _choice(cfg, "optim.nesterov", [True, False])
    _num(cfg, "optim.weight_decay", 0)
    betas = cfg["optim"]["betas"]
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas)):
        raise ConfigError(f"optim.betas must be a list of two numbers, got {betas!r}")
    _num(cfg, "schedule.epochs", 1, integer=True)
    _num(cfg, "schedule.warmup_epochs", 0)
    _num(cfg, "schedule.min_lr", 0)
    _choice(cfg, "amp", ["auto", "bf16", "fp16", "off"])
    _num(cfg, "eval.epoch_draws", 0, integer=True)
    _num(cfg, "eval.draws", 1, integer=True)
    etas = cfg["eval"]["etas"]
    if not isinstance(etas, list) or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and e >= 0
            for e in etas):
        raise ConfigError(f"eval.etas must be a list of numbers >= 0, got {etas!r}")
    _num(cfg, "log.every", 1, integer=True)
    _choice(cfg, "log.progress", [True, False])
    _num(cfg, "checkpoint.every_steps", 0, integer=True)
    _choice(cfg, "checkpoint.best", [True, False])
    init = cfg["model"]["init"]
    if init is not None and not isinstance(init, str):
        raise ConfigError(f"model.init must be null, 'teacher' or a file path, got {init!r}")
    _validate_more(cfg)
    return cfg


def _check_task_fits(cfg: dict) -> None:
    """A causal LM's recipe names a language model and token data (both built in or import paths),
    or neither (fit's given model and data); a classifier's names no language model or token data."""
    from .data import LM_DATASETS
    from .importpath import is_import_path
    from .models import LM_ARCHS

    arch, dataset = cfg["model"]["arch"], cfg["data"]["dataset"]
    lm = cfg["task"] == "causal_lm"
    if lm and (arch is None) != (dataset is None):
        raise ConfigError(f"task=causal_lm: set both model.arch and data.dataset (a recipe's language model "
                          f"and token data, e.g. tiny_llama and licenses) or neither (fastnoise.train.fit's "
                          f"given model and data), got model.arch={arch!r}, data.dataset={dataset!r}")
    for key, value, names, what in (("model.arch", arch, LM_ARCHS, "a causal language model"),
                                    ("data.dataset", dataset, LM_DATASETS, "token data")):
        if not isinstance(value, str) or is_import_path(value):
            continue
        if lm and value not in names:
            raise ConfigError(f"{key}={value!r} is a classifier's: task=causal_lm takes {what} "
                              f"({', '.join(sorted(names))} or an import path package.module:function)")
        if not lm and value in names:
            raise ConfigError(f"{key}={value!r} is {what}: set task=causal_lm")


SEED_MAX = 2**63 - 1  # torch's generators and the data order take seeds up to this


def _validate_more(cfg: dict) -> None:
    """Types of the remaining keys and the rules that tie two keys together."""
    name = cfg["name"]
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or any(
            c in name for c in "/\\\0"):
        raise ConfigError(f"name must be a non-empty string without path separators (it names the run "
                          f"folder runs/NAME), got {name!r}")
    _num(cfg, "seed", 0, SEED_MAX, integer=True)
    _choice(cfg, "data.augment", [True, False])
    _choice(cfg, "data.skip_unreadable", [True, False])
    for key in ("data.root", "teacher.weights"):
        section, leaf = key.split(".")
        v = cfg[section][leaf]
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{key} must be null or a path, got {v!r}")
    for i, b in enumerate(cfg["optim"]["betas"]):
        if isinstance(b, bool) or not math.isfinite(b) or not 0 <= b < 1:
            raise ConfigError(f"optim.betas[{i}] must be a number in [0, 1), got {b!r}")
    lr, min_lr = cfg["optim"]["lr"], cfg["schedule"]["min_lr"]
    if min_lr > lr:
        raise ConfigError(f"schedule.min_lr={min_lr!r} is above optim.lr={lr!r}: the cosine decays from "
                          "optim.lr to schedule.min_lr, so min_lr must be <= lr")
    t_lr = cfg["teacher"]["lr"]
    if t_lr is not None and min_lr > t_lr:
        raise ConfigError(f"schedule.min_lr={min_lr!r} is above teacher.lr={t_lr!r} (the teacher run's lr)")


def resolve(recipe: str, overrides=(), data_root=None) -> dict:
    """Recipe + overrides (+ ``--data``), validated."""
    cfg = load_recipe(recipe)
    if data_root is not None:
        cfg["data"]["root"] = str(data_root)
    cfg = apply_overrides(cfg, overrides)
    return validate(cfg)
