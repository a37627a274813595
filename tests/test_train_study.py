"""fastnoise study: the interval on synthetic numbers with a known answer, the same chips, and the
plumbing (2 seeds x 2 chips on a tiny model): tables, CSV, pairing, resume, refusals."""

import csv
import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

import fastnoise
from fastnoise.cli import main
from fastnoise.train import study as S
from fastnoise.train.data import build_data, eval_loader
from fastnoise.train.models import build_model
from fastnoise.train.recipes import ConfigError, load_recipe, resolve
from fastnoise.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the interval
@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 29, 200])
@pytest.mark.parametrize("p", [0.975, 0.9, 0.6, 0.025])
def test_t_quantile_matches_scipy(df, p):
    assert S.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8, abs=1e-9)


def test_paired_difference_known_answer():
    # per-seed means 1, 2, 3 (whatever the spread of the draws within each seed)
    d = S.paired_difference([[0.0, 2.0], [2.0, 2.0, 2.0], [3.5, 2.5]])
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd of (1, 2, 3) is 1
    assert d["mean"] == pytest.approx(2.0)
    assert d["low"] == pytest.approx(2.0 - half) and d["high"] == pytest.approx(2.0 + half)
    assert d["seeds"] == 3 and d["seed_means"] == pytest.approx([1.0, 2.0, 3.0])
    one = S.paired_difference([[1.0, 3.0]])
    assert one["mean"] == 2.0 and math.isnan(one["low"]) and math.isnan(one["high"])
    with pytest.raises(ValueError, match="seed 1 has no differences"):
        S.paired_difference([[1.0], []])
    with pytest.raises(ValueError, match="level"):
        S.paired_difference([[1.0], [2.0]], level=1.5)


@pytest.mark.slow
def test_interval_covers_the_true_difference_95_percent_of_the_time():
    """Nested synthetic studies with a known mean difference: seed effects (sd 1) and chip
    effects within a seed (sd 2), 3 seeds x 8 chips. The t interval over per-seed means covers
    the truth ~95% of the time; the naive interval that treats all 24 chips as independent does
    not (it ignores that chips share a seed's trained models)."""
    rng = np.random.default_rng(0)
    true, n_studies, seeds, chips = 0.7, 4000, 3, 8
    covered = naive_covered = 0
    for _ in range(n_studies):
        d = true + rng.normal(0, 1.0, (seeds, 1)) + rng.normal(0, 2.0, (seeds, chips))
        r = S.paired_difference(d.tolist())
        covered += r["low"] <= true <= r["high"]
        flat = d.ravel()
        half = stats.t.ppf(0.975, flat.size - 1) * flat.std(ddof=1) / math.sqrt(flat.size)
        naive_covered += abs(flat.mean() - true) <= half
    assert 0.935 <= covered / n_studies <= 0.965
    assert naive_covered / n_studies < 0.85


# ----------------------------------------------------------------------------- the same chips
def _digits_models(n=2):
    cfg = resolve("digits", ["model.arch=digits_mlp"])
    loader = eval_loader(build_data(cfg).val, 512, 0, False)
    models = []
    for i in range(n):
        torch.manual_seed(100 + i)  # different weights
        fastnoise.manual_seed(i)  # any build order and global seed: chips follow names
        if i:
            build_model("digits_mlp", 10)  # another model built in between changes nothing
        models.append(fastnoise.convert(build_model("digits_mlp", 10), fastnoise.NoiseSpec(eta=0.2)))
    return models, loader


@pytest.mark.slow
def test_evaluate_on_chips_gives_the_same_chips_for_the_same_number():
    (a, b), loader = _digits_models()
    assert S.chip_identity(a) == S.chip_identity(b) == ("fc1", "fc")
    ra = S.evaluate_on_chips(a, loader, [0.0, 0.2], 4, chips=3, progress=False)
    fastnoise.manual_seed(99)  # whatever the global seed was before, chips=3 is chips=3
    ra2 = S.evaluate_on_chips(a, loader, [0.0, 0.2], 4, chips=3, progress=False)
    assert ra.accuracies == ra2.accuracies
    other = S.evaluate_on_chips(a, loader, [0.0, 0.2], 4, chips=4, progress=False)
    assert other.accuracies[1] != ra.accuracies[1] and other.accuracies[0] == ra.accuracies[0]
    # the noise itself: the same z on both models for one chip (sigma is each model's own)
    torch.manual_seed(0)
    x = torch.randn(200, 1, 8, 8)
    outs = []
    for m in (a, b):
        m.eval()
        with torch.no_grad(), fastnoise.noise(eta=0.2, draw=1, seed=3):
            noisy = m.fc1(x.flatten(1))
        clean = m.fc1(x.flatten(1)).detach()
        sigma = 0.2 * float(m.fc1.weight.detach().max() - m.fc1.weight.detach().min())
        outs.append(torch.linalg.lstsq(x.flatten(1), (noisy - clean)).solution.T / sigma)  # = z
    torch.testing.assert_close(outs[0], outs[1], atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- plumbing
TINY = ["model.arch=digits_mlp", "method.layers=[fc1]", "teacher.epochs=1", "schedule.epochs=1",
        "data.batch_size=256", "eval.epoch_draws=0"]


def _study(out, *extra, seeds=("0", "1")):
    return main(["study", "--recipe", "digits", "--out", out, "--seeds", *seeds, "--etas", "0", "0.1", "0.15",
                 "--draws", "2", "--no-progress", "--device", "cpu", *TINY, *extra])


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_study_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "study")
    assert _study(out) == 0
    text = capsys.readouterr().out
    assert "| eta | teacher | clean | noise | kd | consistency |" in text
    assert "| eta | clean - noise | kd - noise | consistency - noise |" in text
    for name in ("study.json", "accuracies.csv", "tables.md", "robustness.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.path.isfile(os.path.join(out, "teacher", "model.pth"))
    for s in (0, 1):
        for m in S.STUDY_METHODS:
            assert os.path.isfile(os.path.join(out, f"seed{s}", m, "model.pth"))
    rows = _csv(os.path.join(out, "accuracies.csv"))
    models = ["teacher", *S.STUDY_METHODS]
    assert len(rows) == len(models) * 2 * (1 + 2 * 2)  # models x seeds x (clean pass + 2 etas x 2 chips)
    acc = {(r["model"], int(r["seed"]), float(r["eta"]), r["draw"]): float(r["top1"]) for r in rows}
    assert all(r["seed"] == r["chips"] for r in rows)

    # the table's cells, recomputed from the CSV: mean ± std over seeds x chips, and the paired
    # difference (same seed, same chip) with the t interval over the per-seed means
    tables = open(os.path.join(out, "tables.md")).read()
    assert tables.strip() in text
    vals = [acc[("kd", s, 0.1, k)] for s in (0, 1) for k in ("0", "1")]
    assert f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}" in text
    seed_means = [np.mean([acc[("kd", s, 0.1, k)] - acc[("noise", s, 0.1, k)] for k in ("0", "1")])
                  for s in (0, 1)]
    half = stats.t.ppf(0.975, 1) * np.std(seed_means, ddof=1) / math.sqrt(2)
    m = np.mean(seed_means)
    row = [line for line in text.splitlines() if line.startswith("| 0.1 |")][-1]
    assert f"{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]" in row
    # noise hurts: every model is worse at eta 0.15 than clean, averaged over chips and seeds
    for name in models:
        clean = np.mean([acc[(name, s, 0.0, "")] for s in (0, 1)])
        noisy = np.mean([acc[(name, s, 0.15, k)] for s in (0, 1) for k in ("0", "1")])
        assert noisy < clean + 1.0, name

    # the teacher met the same chips as the students in each seed: re-evaluating it there
    # reproduces the study's numbers
    cfg = resolve("digits", TINY)
    model, _ = S._load_model(cfg, os.path.join(out, "teacher", "model.pth"), 10, torch.device("cpu"))
    loader = eval_loader(build_data(cfg).val, cfg["data"]["eval_batch_size"], 0, False)
    again = S.evaluate_on_chips(model, loader, [0.1], 2, chips=1, progress=False)
    assert again.accuracies[0] == [acc[("teacher", 1, 0.1, "0")], acc[("teacher", 1, 0.1, "1")]]

    # an existing study folder is refused without --resume; --resume reuses every run and
    # evaluation (nothing retrained: the weights files are untouched) and prints the same tables
    before = {p: os.path.getmtime(os.path.join(out, p)) for p in ("teacher/model.pth", "seed1/kd/model.pth")}
    capsys.readouterr()
    assert _study(out) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert _study(out, "--resume") == 0
    assert tables.strip() in capsys.readouterr().out
    assert open(os.path.join(out, "tables.md")).read() == tables
    assert {p: os.path.getmtime(os.path.join(out, p)) for p in before} == before
    assert _csv(os.path.join(out, "accuracies.csv")) == rows
    # other settings cannot resume it
    assert _study(out, "--resume", "optim.lr=0.5") == 2
    assert "cannot resume study" in capsys.readouterr().err


@pytest.mark.slow
def test_study_resumes_an_interrupted_run(tmp_path, capsys):
    """A student killed mid-run (last.pt, no model.pth) is resumed, not restarted: the resumed
    study's accuracies equal an uninterrupted study's."""
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    args = ("schedule.epochs=2", "--methods", "noise", "kd")
    assert _study(full, *args, seeds=("0",)) == 0
    assert _study(cut, *args, seeds=("0",)) == 0
    run = os.path.join(cut, "seed0", "kd")
    # put the kd run back to its state after step 3 (of 10): train it again, stopped there, with
    # the settings the study gave it (its config.yaml)
    cfg = load_recipe(os.path.join(run, "config.yaml"))
    Trainer(cfg, run, overwrite=True, stop_at_step=3, progress=False, device="cpu").fit()
    assert not os.path.exists(os.path.join(run, "model.pth"))
    for f in os.listdir(os.path.join(cut, "evals")):
        os.remove(os.path.join(cut, "evals", f))
    capsys.readouterr()
    assert _study(cut, *args, "--resume", seeds=("0",)) == 0
    assert "resumed" in capsys.readouterr().out
    assert _csv(os.path.join(cut, "accuracies.csv")) == _csv(os.path.join(full, "accuracies.csv"))


def test_study_refuses_bad_settings_and_foreign_folders(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _study(str(busy)) == 2
    assert "was not written by fastnoise study" in capsys.readouterr().err
    assert _study(str(busy), "--resume") == 2
    assert os.listdir(busy) == ["notes.txt"]
    out = str(tmp_path / "s")
    cases = [
        (["--methods", "noise", "dropout"], "unknown study method 'dropout'"),
        (["--draws", "0"], "--draws must be an int >= 1"),
        (["teacher.epochs=0"], "the study needs a teacher"),
        (["method.layers=[]"], "method.layers is empty"),
    ]
    for extra, fragment in cases:
        assert _study(out, *extra) == 2
        assert fragment in capsys.readouterr().err
    assert _study(out, seeds=("0", "0")) == 2
    assert "seeds has repeats" in capsys.readouterr().err
    assert not os.path.exists(out)
    with pytest.raises(ConfigError, match="--etas"):
        S.run_study("digits", etas=[0.0, -1.0], out=out, overrides=TINY, progress=False)
