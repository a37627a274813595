"""Every file of a study (``fastnoise study`` and ``fit_study``) is written atomically, through the
run folder's writer (``fastnoise.train.runfolder.atomic_path``: a temporary name that carries the
pid, renamed over the file), so a kill or a full disk mid-write leaves the old file whole and
``--resume`` works; a damaged ``study.json`` is one clear error.
"""

from __future__ import annotations

import os

import pytest

from fastnoise.cli import main
from fastnoise.train import runfolder as rf

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.arch=digits_mlp", "method.layers=[fc1]", "teacher.epochs=1", "schedule.epochs=1",
        "data.batch_size=256", "eval.epoch_draws=0"]
FILES = ["study.json", "accuracies.csv", "tables.md", "robustness.png", "evals/teacher-seed0.json",
         "evals/noise-seed0.json"]


def _study(out, *extra):
    return main(["study", "--recipe", "digits", "--out", out, "--seeds", "0", "--etas", "0", "0.1",
                 "--draws", "1", "--methods", "noise", "--no-progress", "--device", "cpu", *TINY, *extra])


@pytest.fixture
def faults(monkeypatch):
    """Set FASTNOISE_FAULT / FASTNOISE_FAULT_TRACE in this process (hit counts start at 0)."""
    rf._hits.clear()

    def set_(**env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        rf._hits.clear()

    yield set_
    rf._hits.clear()


def test_every_study_file_is_written_atomically_and_a_failed_rewrite_keeps_the_old_one(
        tmp_path, faults, capsys):
    """Each file passes the writer's fault points; ``--resume`` rewrites study.json at once: a full
    disk there (as a kill would) leaves the old file whole, and the next ``--resume`` finishes.
    (fit_study writes through the same functions.)"""
    out = str(tmp_path / "study")
    trace = str(tmp_path / "trace.txt")
    faults(FASTNOISE_FAULT_TRACE=trace)
    assert _study(out) == 0
    with open(trace) as f:
        points = {line.strip() for line in f}
    for name in FILES:
        parent = os.path.basename(os.path.dirname(os.path.join(out, name)))
        assert f"temp:{parent}/{os.path.basename(name)}" in points, name
        assert os.path.isfile(os.path.join(out, name)), name
    assert [f for _, _, files in os.walk(out) for f in files if ".tmp" in f] == []

    before = open(os.path.join(out, "study.json"), "rb").read()
    tables = open(os.path.join(out, "tables.md"), "rb").read()
    capsys.readouterr()
    faults(FASTNOISE_FAULT="temp:study.json:enospc")
    assert _study(out, "--resume") == 2
    assert "no space left on device" in capsys.readouterr().err
    assert open(os.path.join(out, "study.json"), "rb").read() == before  # whole, not 0 bytes
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    faults(FASTNOISE_FAULT="temp:tables.md:enospc")
    assert _study(out, "--resume") == 2
    assert open(os.path.join(out, "tables.md"), "rb").read() == tables
    faults(FASTNOISE_FAULT="")
    assert _study(out, "--resume") == 0
    assert open(os.path.join(out, "tables.md"), "rb").read() == tables


def test_a_damaged_study_json_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_bytes(b"")  # what an interrupted in-place rewrite left
    (out / "evals").mkdir()
    capsys.readouterr()
    assert _study(str(out), "--resume") == 2
    err = capsys.readouterr().err
    assert "study.json cannot be read" in err and "Traceback" not in err
