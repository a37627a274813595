"""Exact resume: 2N steps in one process equal N steps, save, and N more in a fresh process."""

import csv
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

# KD with a teacher trained first (in RUN/teacher), 10 steps per epoch, 2 epochs; the stop at
# step 13 falls inside the second epoch, so the resumed run must skip the consumed batches
OVERRIDES = ["model.arch=digits_mlp", "teacher.epochs=1", "method.name=kd", "noise.eta=0.1",
             "data.batch_size=128", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
             "eval.etas=[0.0, 0.08]", "eval.draws=2", "eval.epoch_draws=1", "log.every=1"]


def _cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "fastnoise.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _rows(path, drop=()):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    _cli("train", "--recipe", "digits", "--out", full, "--no-progress", *OVERRIDES, cwd=tmp_path)
    out = _cli("train", "--recipe", "digits", "--out", split, "--no-progress", "--stop-at-step", "13",
               *OVERRIDES, cwd=tmp_path)
    assert "stopped at step 13" in out
    assert len(_rows(os.path.join(split, "steps.csv"))) == 13
    assert not os.path.exists(os.path.join(split, "model.pth"))
    out = _cli("train", "--resume", "--out", split, "--no-progress", cwd=tmp_path)
    assert "resumed" in out and "at epoch 1, step 13" in out

    # every step's loss (full float repr), the per-epoch metrics, the weights, the robustness table
    steps_full, steps_split = _rows(os.path.join(full, "steps.csv")), _rows(os.path.join(split, "steps.csv"))
    assert len(steps_full) == 20
    assert steps_split == steps_full
    assert len({r["loss"] for r in steps_full}) == 20
    metrics = [_rows(os.path.join(d, "metrics.csv"), drop=("seconds",)) for d in (full, split)]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 2
    a = torch.load(os.path.join(full, "model.pth"), weights_only=True)
    b = torch.load(os.path.join(split, "model.pth"), weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _rows(os.path.join(full, "robustness.csv")) == _rows(os.path.join(split, "robustness.csv"))
    ck = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert ck["global_step"] == 20 and ck["epoch"] == 2
    assert all(s["calls"] == 20 for s in ck["noise"].values())
