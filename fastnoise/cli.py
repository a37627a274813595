"""The ``fastnoise`` command.

    fastnoise demo [--out DIR] [--seed N] [--epochs N] [--draws N]
    fastnoise train --recipe NAME|FILE [--data DIR] [--out DIR] [--resume | --overwrite] [key=value ...]
    fastnoise eval (--run DIR | --recipe NAME|FILE --weights FILE) [--data DIR] [--etas ...] [--draws N]
    fastnoise study --recipe NAME|FILE [--seeds 0 1 2] [--etas ...] [--draws N] [--out DIR] [--resume]
                    [--methods ...] [--data DIR] [--threads N] [key=value ...]
    fastnoise recipes [NAME|FILE]

``study`` trains one clean teacher, then a clean, a noise, a KD + noise and a consistency student
from it per seed, measures every model on the same simulated chips at each eta and prints
top-1 mean ± std per cell and each method's paired difference to noise-only with a 95%
confidence interval (:mod:`fastnoise.train.study`). A ``task: causal_lm`` recipe (the shipped
``licenses-llama``: a byte-level tiny Llama on Debian's license texts) trains, evaluates and studies
a causal language model the same way, in perplexity.

Overrides are ``key=value`` pairs with dotted keys (``optim.lr=0.05``, ``noise.exclude=[fc]``),
typed by YAML parsing; an unknown key is an error. Under ``torchrun`` (``torchrun
--nproc_per_node N -m fastnoise.cli train ...``) ``train`` runs data-parallel.

A user error (a bad flag or setting, a missing or damaged file, a full disk, a run folder in use,
a diverged run) is one ``fastnoise: error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other user error."""

    def error(self, message: str):
        self.exit(2, f"fastnoise: error: {message} (see {self.prog} --help)\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


SETTINGS_HELP = ("Settings (the keys of key=value overrides and of recipe files, e.g. schedule.epochs=5): "
                 "`fastnoise recipes NAME` prints every key of a recipe with its value and the "
                 "recipe's file; docs/cli.md explains each key (defaults: "
                 "fastnoise.train.recipes.DEFAULTS).")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastnoise", description="Weight-noise training and robustness "
                                     "evaluation (noise injection, KD + noise, consistency regularization).",
                     epilog=SETTINGS_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="every method on scikit-learn's bundled digits, accuracy vs eta",
                       epilog=SETTINGS_HELP)
    d.add_argument("--out", default="fastnoise-demo",
                   help="output folder (default: fastnoise-demo); a folder an earlier demo wrote is "
                   "replaced, any other existing folder is refused")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epochs", type=int, default=None, help="student epochs (recipe: 15)")
    d.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (recipe: 20)")
    d.add_argument("--draws", type=int, default=20, help="noise draws per eta (default 20)")
    d.add_argument("--eta", type=float, default=None, help="training eta of the students (recipe: 0.1)")
    d.add_argument("--methods", nargs="+", default=None, help="subset of: clean noise kd consistency")
    d.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("overrides", nargs="*", help="digits-recipe overrides key=value")

    t = sub.add_parser("train", help="train with a recipe", epilog=SETTINGS_HELP)
    t.add_argument("--recipe", default=None, help="a shipped recipe name or a YAML file")
    t.add_argument("--data", default=None, help="dataset folder (sets data.root)")
    t.add_argument("--out", default=None, help="run folder (default: runs/NAME)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    g.add_argument("--overwrite", action="store_true", help="replace the run files in an existing --out")
    t.add_argument("--stop-at-step", type=int, default=None, help="stop (and save) after this many steps")
    _add_common(t)
    t.add_argument("overrides", nargs="*", help="key=value settings")

    e = sub.add_parser("eval", help="robustness table of a trained model", epilog=SETTINGS_HELP)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default=None, help="a run folder (its config.yaml and weights)")
    src.add_argument("--recipe", default=None, help="a recipe, with --weights")
    e.add_argument("--weights", default=None, help="state_dict or checkpoint file (with --recipe; "
                   "with --run default model.pth, else last.pt)")
    e.add_argument("--data", default=None, help="dataset folder (sets data.root)")
    e.add_argument("--etas", type=float, nargs="+", default=None, help="noise levels (default: eval.etas)")
    e.add_argument("--draws", type=int, default=None, help="draws per eta (default: eval.draws)")
    e.add_argument("--hardware", default=None,
                   help="evaluate on chips of this hardware model (pcm) instead of Gaussian noise")
    e.add_argument("--times", type=float, nargs="+", default=None,
                   help="with --hardware: seconds after programming (default 1 3600 86400 3.15e7)")
    e.add_argument("--out", default=None, help="folder for robustness.csv/png (default: RUN/eval)")
    e.add_argument("--overwrite", action="store_true")
    _add_common(e)
    e.add_argument("overrides", nargs="*", help="key=value settings")

    st = sub.add_parser("study", help="every method from one teacher over seeds, on the same chips, "
                        "with paired differences and confidence intervals", epilog=SETTINGS_HELP)
    st.add_argument("--recipe", required=True, help="a shipped recipe name or a YAML file")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default 0 1 2)")
    st.add_argument("--etas", type=float, nargs="+", default=None,
                    help="noise levels (default: 0, 0.5, 1, 1.5 times noise.eta)")
    st.add_argument("--draws", type=int, default=None, help="simulated chips per seed and eta (default 8)")
    st.add_argument("--methods", nargs="+", default=None, help="subset of: clean noise kd consistency")
    st.add_argument("--hardware", default=None,
                    help="also evaluate every model on chips of this hardware model (pcm)")
    st.add_argument("--times", type=float, nargs="+", default=None,
                    help="with --hardware: seconds after programming (default 1 86400 3.15e7)")
    st.add_argument("--data", default=None, help="dataset folder (sets data.root)")
    st.add_argument("--out", default=None, help="study folder (default: runs/study-NAME)")
    st.add_argument("--resume", action="store_true", help="continue the study in --out")
    st.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's; 1 is fastest for small models on a "
                    "busy machine)")
    _add_common(st)
    st.add_argument("overrides", nargs="*", help="key=value settings")

    r = sub.add_parser("recipes", help="list the shipped recipes; with NAME, print that recipe's every "
                       "setting and its file", epilog=SETTINGS_HELP)
    r.add_argument("name", nargs="?", default=None, help="a shipped recipe name or a YAML file")
    parser.commands = dict(sub.choices)
    return parser


# ----------------------------------------------------------------------------- commands
def _cmd_demo(args) -> int:
    from .train.demo import DEMO_METHODS, run_demo

    run_demo(args.out, seed=args.seed, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
             draws=args.draws, eta=args.eta, methods=tuple(args.methods or DEMO_METHODS),
             overrides=args.overrides, progress=not args.no_progress, device=args.device)
    print(f"wrote {os.path.join(args.out, 'robustness.png')} and robustness.csv, table.md")
    return 0


def _run_config(folder, data, overrides, missing: str) -> dict:
    """A run folder's settings (last.pt's, checked against a complete config.yaml; see
    :func:`fastnoise.train.runfolder.read_run`), with --data and key=value overrides."""
    from .train import runfolder as rf
    from .train.recipes import ConfigError, apply_overrides, validate
    from .train.trainer import _RESUMABLE_CHANGES, CHECKPOINT_VERSION

    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is not a run folder (it is a file)")
    cfg = rf.read_run(folder, CHECKPOINT_VERSION, _RESUMABLE_CHANGES).config
    if cfg is None:
        raise ConfigError(missing.format(folder))
    if data is not None:
        cfg["data"]["root"] = data
    return validate(apply_overrides(cfg, overrides))


def _cmd_train(args) -> int:
    from .train.recipes import ConfigError, resolve
    from .train.trainer import Trainer

    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out RUN_FOLDER")
        cfg = _run_config(args.out, args.data, args.overrides, "cannot resume: {!r} has no config.yaml")
        if args.recipe is not None and resolve(args.recipe)["name"] != cfg["name"]:
            raise ConfigError(f"--recipe {args.recipe!r} is not the recipe of {args.out!r} ({cfg['name']!r})")
    else:
        if args.recipe is None:
            raise ConfigError("train needs --recipe NAME (see `fastnoise recipes`)")
        cfg = resolve(args.recipe, args.overrides, args.data)
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out is empty: give a run folder")
    out = args.out or os.path.join("runs", cfg["name"])
    Trainer(cfg, out, resume=args.resume, overwrite=args.overwrite, stop_at_step=args.stop_at_step,
            progress=False if args.no_progress else None, device=args.device, cli=True).fit()
    return 0


def _cmd_eval(args) -> int:
    import torch

    from . import rng
    from .convert import convert
    from .robustness import evaluate_robustness
    from .spec import NoiseSpec
    from .train import checkpoint as ckpt
    from .train import distributed
    from .train import runfolder as rf
    from .train.data import build_data, eval_loader
    from .train.kinds import kind_for
    from .train.models import CLASSIFIER, CONVNETS, build_model
    from .train.recipes import ConfigError, resolve

    if args.run is not None:
        cfg = _run_config(args.run, args.data, args.overrides, "{!r} is not a run folder: no config.yaml")
        weights = args.weights
        if weights is None:
            model_file = os.path.join(args.run, "model.pth")
            weights = model_file if os.path.isfile(model_file) else os.path.join(args.run, "last.pt")
        out = args.out or os.path.join(args.run, "eval")
    else:
        if args.weights is None:
            raise ConfigError("eval --recipe needs --weights FILE")
        cfg = resolve(args.recipe, args.overrides, args.data)
        weights = args.weights
        out = args.out or os.path.join("runs", f"{cfg['name']}-eval")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output folder {out!r} exists and is not a folder")
    if rf.user_entries(out) and not args.overwrite:
        raise ConfigError(f"output folder {out!r} already exists; pass --overwrite or another --out")
    etas = args.etas if args.etas is not None else cfg["eval"]["etas"]
    draws = args.draws if args.draws is not None else cfg["eval"]["draws"]
    if not etas and args.hardware is None:
        raise ConfigError("no etas to evaluate (give --etas)")
    for e in etas or ():
        if not math.isfinite(e) or e < 0:
            raise ConfigError(f"--etas must be finite numbers >= 0, got {e!r}")
    if draws < 1:
        raise ConfigError(f"--draws must be >= 1, got {draws}")
    chip = {}
    if args.hardware is not None or args.times is not None:
        from .train.study import _check_chip

        hw, times = _check_chip(args.hardware, args.times or [1.0, 3600.0, 86400.0, 3.15e7], "--")
        chip = {"hardware": hw, "times": times}
        etas = None

    info = distributed.setup(args.device)
    data = build_data(cfg)
    want = cfg["data"]["num_classes"]
    if want is not None and want != data.num_classes:
        raise ConfigError(f"data.num_classes={want} but the data has {data.num_classes} classes")
    # the trainer's seeds and build order, so the layers' ids (hence the chips) are the same
    torch.manual_seed(cfg["seed"])
    rng.manual_seed(cfg["seed"])
    arch = cfg["model"]["arch"]
    kind_for(cfg["task"]).check_built(cfg, data)  # the model takes the data (a classifier or a causal LM)
    model = build_model(arch, data.num_classes)
    ckpt.load_weights(model, weights, "weights", arch, CLASSIFIER[arch], data.num_classes)
    n = cfg["noise"]
    spec = NoiseSpec(eta=n["eta"], scale=n["scale"], noise_bias=n["noise_bias"])
    convert(model, spec, exclude=n["exclude"] or None)
    # as the run's own table at the end of train: its memory format (model.channels_last; the
    # fashion recipes set it, ~2x on the CPU) and its chips (the run's seed)
    cl = cfg["model"]["channels_last"]
    cl = info.device.type == "cuda" and arch in CONVNETS if cl == "auto" else bool(cl)
    model.to(info.device, memory_format=torch.channels_last if cl else torch.contiguous_format)
    loader = eval_loader(data.val, cfg["data"]["eval_batch_size"], cfg["data"]["workers"],
                         info.device.type == "cuda", info.rank, info.world_size)
    amp = cfg["amp"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if amp == "auto" and info.device.type == "cuda":
        dtype = torch.bfloat16
    result = evaluate_robustness(model, loader, etas, draws, device=info.device, name=cfg["name"],
                                 progress=not args.no_progress and info.is_main, autocast_dtype=dtype,
                                 distributed=info.distributed, channels_last=cl, seed=cfg["seed"],
                                 task=cfg["task"], **chip)
    if info.is_main:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise rf.RunFolderError(f"cannot create output folder {out!r}: {e.strerror or e}") from e
        with rf.RunLock(out):  # one writer; each file whole or not at all
            if rf.user_entries(out) and not args.overwrite:  # written meanwhile by another process
                raise ConfigError(f"output folder {out!r} already exists; pass --overwrite or another --out")
            with rf.atomic_path(os.path.join(out, "robustness.csv")) as tmp:
                result.to_csv(tmp)
            with rf.atomic_path(os.path.join(out, "robustness.png")) as tmp:
                result.plot(tmp)
        print(result.table())
        print(f"wrote {os.path.join(out, 'robustness.csv')} and robustness.png")
    return 0


def _cmd_study(args) -> int:
    import torch

    from .train.recipes import ConfigError
    from .train.study import DEFAULT_DRAWS, STUDY_METHODS, run_study

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    study = run_study(args.recipe, seeds=args.seeds, etas=args.etas,
                      draws=DEFAULT_DRAWS if args.draws is None else args.draws, out=args.out,
                      methods=tuple(args.methods or STUDY_METHODS), overrides=args.overrides,
                      data_root=args.data, resume=args.resume, progress=not args.no_progress,
                      device=args.device, hardware=args.hardware, times=args.times)
    print(f"wrote {os.path.join(study.out, 'tables.md')}, accuracies.csv and robustness.png")
    return 0


def _flat(cfg: dict, where: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{where}{key}."))
        else:
            out[f"{where}{key}"] = value
    return out


def _cmd_recipes(args) -> int:
    import json

    from .train.recipes import DEFAULTS, list_recipes, load_recipe, recipe_path

    if args.name is None:
        for name in list_recipes():
            print(name)
        return 0
    path = recipe_path(args.name)
    cfg, defaults = _flat(load_recipe(args.name)), _flat(DEFAULTS)
    print(f"# {path}")
    print("# every setting of the run (key=value overrides take these keys; docs/cli.md explains them)")
    lines = [f"{key}={json.dumps(value)}" for key, value in cfg.items()]  # JSON is YAML: as an override
    width = max(map(len, lines))
    for line, (key, value) in zip(lines, cfg.items(), strict=True):
        same = value == defaults[key] and type(value) is type(defaults[key])
        print(line if same else f"{line.ljust(width)}  # set by the recipe")
    return 0


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``fastnoise`` console script; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in parser.commands:
        # intermixed: overrides may come before or after the options
        args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    else:
        args = parser.parse_args(argv)  # help, or the error for a missing / unknown command
    from .train.recipes import ConfigError

    handlers = {"demo": _cmd_demo, "train": _cmd_train, "eval": _cmd_eval, "study": _cmd_study,
                "recipes": _cmd_recipes}
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"fastnoise: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's, not ours: a file that cannot be read or written
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"fastnoise: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastnoise: interrupted; a run folder keeps its last checkpoint (continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
