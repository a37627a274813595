"""``fastnoise demo``: every method on scikit-learn's digits, compared under weight noise.

1. Train a clean teacher (``digits`` recipe, ``method.name=clean``).
2. Starting from it, train one student per method at the training eta: ``clean`` (no noise,
   the same budget), ``noise`` (noise injection), ``kd`` (KD + noise), ``consistency``.
3. Measure every model's top-1 on the 450 held-out digits at each eta over ``draws`` simulated
   chips (the same chips for every model: the layers' ids and the seed are the same), print
   one ``mean ± std`` column per model, write ``robustness.csv``, ``robustness.png`` and
   ``table.md`` into the output folder (one run folder per model beside them).

Deterministic given ``seed``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Optional

import torch

from ..robustness import plot_results, results_table, results_to_csv
from . import runfolder as rf
from .recipes import ConfigError, resolve, validate
from .trainer import Trainer, teacher_config

__all__ = ["DEMO_ETAS", "DEMO_METHODS", "run_demo"]

DEMO_ETAS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1)
DEMO_METHODS = ("clean", "noise", "kd", "consistency")
MARKER = "demo.json"


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"demo output {out!r} exists and is not a folder")
    if rf.user_entries(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise ConfigError(f"demo output folder {out!r} exists and was not written by the demo; "
                          "choose another with --out")


def run_demo(out: str = "fastnoise-demo", *, seed: int = 0, epochs: Optional[int] = None,
             teacher_epochs: Optional[int] = None, draws: int = 20, eta: Optional[float] = None,
             etas=DEMO_ETAS, methods=DEMO_METHODS, overrides=(), progress: bool = True,
             device=None, log: Callable[[str], None] = print) -> dict:
    """Run the demo; returns ``{"results": {name: RobustnessResult}, "table": str, "out": out}``.

    A folder written by an earlier demo is replaced; any other existing folder is refused.
    """
    sets = [f"seed={seed}"]
    if epochs is not None:
        sets.append(f"schedule.epochs={epochs}")
    if teacher_epochs is not None:
        sets.append(f"teacher.epochs={teacher_epochs}")
    if eta is not None:
        sets.append(f"noise.eta={eta}")
    cfg = resolve("digits", [*sets, *overrides])
    for m in methods:
        if m not in DEMO_METHODS:
            raise ConfigError(f"unknown demo method {m!r}; choose from {list(DEMO_METHODS)}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ConfigError(f"--draws must be an int >= 1, got {draws!r}")
    try:  # every run's settings hold before the first byte is written
        validate(teacher_config(cfg))
    except ConfigError as e:
        raise ConfigError(f"the demo's teacher run: {e}") from None
    for m in methods:
        validate(_student_config(cfg, m, "teacher.pth"))
    _check_out(out)
    threads = torch.get_num_threads()
    # the digits models are tiny: a second thread only adds synchronisation (and on a busy
    # machine, waiting for a descheduled thread made each small op ~50x slower)
    torch.set_num_threads(1)
    try:
        return _run(cfg, out, seed, draws, etas, methods, progress, device, log)
    finally:
        torch.set_num_threads(threads)


def _student_config(cfg: dict, method: str, teacher_weights: str) -> dict:
    scfg = copy.deepcopy(cfg)
    scfg["eval"]["etas"] = []  # the demo evaluates all models together
    scfg["name"] = f"digits-{method}"
    scfg["method"]["name"] = method
    scfg["teacher"]["weights"] = teacher_weights
    scfg["teacher"]["epochs"] = 0
    return scfg


def _run(cfg, out, seed, draws, etas, methods, progress, device, log) -> dict:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise rf.RunFolderError(f"cannot create demo folder {out!r}: {e.strerror or e}") from e
    with rf.RunLock(out):
        _check_out(out)  # again, now that no other process can write it
        rf.remove_stray_temps(out)
        return _run_locked(cfg, out, seed, draws, etas, methods, progress, device, log)


def _run_locked(cfg, out, seed, draws, etas, methods, progress, device, log) -> dict:
    if os.path.isfile(os.path.join(out, MARKER)):
        log(f"[demo] replacing {out}: it holds an earlier demo's output")
    else:
        log(f"[demo] writing into {out} (a later demo into it replaces it)")
    marker = {"seed": seed, "methods": list(methods), "etas": list(etas), "draws": draws, "config": cfg}
    rf.write_text(os.path.join(out, MARKER), json.dumps(marker, indent=1))

    tcfg = teacher_config(cfg)
    tcfg["eval"]["etas"] = []
    teacher_dir = os.path.join(out, "teacher")
    log(f"[demo] clean teacher: {cfg['model']['arch']}, {tcfg['schedule']['epochs']} epochs")
    trainers = {"teacher": Trainer(tcfg, teacher_dir, overwrite=True, progress=progress, device=device,
                                   log=log)}
    trainers["teacher"].fit()
    for m in methods:
        scfg = _student_config(cfg, m, os.path.join(teacher_dir, "model.pth"))
        log(f"[demo] student '{m}' from the teacher, eta={scfg['noise']['eta']:g} ({scfg['noise']['scale']})")
        trainers[m] = Trainer(scfg, os.path.join(out, m), overwrite=True, progress=progress, device=device,
                              log=log)
        trainers[m].fit()

    results = {}
    for name, t in trainers.items():
        results[name] = t.evaluate(etas=list(etas), draws=draws)
        results[name].name = name
    table = results_table(results)
    samples = next(iter(results.values())).samples
    header = (f"top-1 accuracy (%) on {samples} held-out digits, mean ± std over {draws} noise draws "
              f"per eta (noise scale {cfg['noise']['scale']}; students trained at eta="
              f"{cfg['noise']['eta']:g}, seed {seed})")
    with rf.atomic_path(os.path.join(out, "robustness.csv")) as tmp:
        results_to_csv(results, tmp)
    with rf.atomic_path(os.path.join(out, "robustness.png")) as tmp:
        plot_results(results, tmp,
                     title=f"digits: trained at eta={cfg['noise']['eta']:g}, {draws} draws per eta")
    rf.write_text(os.path.join(out, "table.md"), header + "\n\n" + table + "\n")
    log(header)
    log(table)
    return {"results": results, "table": table, "out": out}
