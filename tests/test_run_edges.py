"""Run folders and the CLI at their edges (issue 21, items 13-15):

- ``--resume`` of a KD run whose ``last.pt`` is gone, after the student had checkpointed, is
  refused with one line naming the file (nothing rewritten); when the logs show the student never
  checkpointed, it starts again from step 0;
- ``train --overwrite`` also clears the replaced run's ``eval/`` (``fastnoise eval --run``'s
  default output), so the next ``eval --run`` is not refused;
- ``--data FILE`` says that it is a file.
"""

from __future__ import annotations

import os
import shutil

import pytest

from fastnoise.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

# digits: 3 steps per epoch at batch 500
TINY = ["--recipe", "digits", "--no-progress", "--device", "cpu", "model.arch=digits_mlp",
        "data.batch_size=500",
        "eval.etas=[0.0]", "eval.epoch_draws=0", "log.every=1"]
KD = [*TINY, "method.name=kd", "teacher.epochs=1", "schedule.epochs=2"]


def _fails(capsys, argv, *fragments):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnoise: error: ") and err.count("\n") == 1, err
    for frag in fragments:
        assert frag in err, f"{frag!r} not in {err!r}"
    return err


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("kd") / "run")
    assert main(["train", *KD, "--out", folder]) == 0
    return folder


def test_kd_resume_without_last_pt_after_a_checkpoint_is_refused(kd_run, tmp_path, capsys):
    folder = str(tmp_path / "run")
    shutil.copytree(kd_run, folder)
    os.remove(os.path.join(folder, "last.pt"))
    for name in ("model.pth", "best.pt", "robustness.csv", "robustness.png"):  # as if killed mid-run
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    before = _files(folder)
    _fails(capsys, ["train", "--resume", "--no-progress", "--device", "cpu", "--out", folder],
           f"{os.path.join(folder, 'last.pt')} is missing", "restore last.pt", "--overwrite")
    assert _files(folder) == before  # steps.csv / metrics.csv not cut
    assert os.path.isfile(os.path.join(folder, "teacher", "model.pth"))


def test_kd_resume_without_last_pt_before_any_checkpoint_starts_the_student_again(kd_run, tmp_path, capsys):
    """The student was killed in its first epoch, before its first last.pt: step 0 is right."""
    folder = str(tmp_path / "run")
    shutil.copytree(kd_run, folder)
    for name in ("last.pt", "model.pth", "best.pt", "metrics.csv", "metrics.json", "robustness.csv",
                 "robustness.png"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    steps = os.path.join(folder, "steps.csv")
    lines = open(steps).read().splitlines(keepends=True)
    open(steps, "w").write("".join(lines[:3]))  # header and steps 1-2 of epoch 0
    capsys.readouterr()
    assert main(["train", "--resume", "--no-progress", "--device", "cpu", "--out", folder]) == 0
    assert "from step 0" in capsys.readouterr().out
    assert _files(folder)["steps.csv"] == _files(kd_run)["steps.csv"]  # the same student as uninterrupted


@pytest.mark.slow
def test_train_overwrite_clears_the_replaced_runs_eval_folder(tmp_path, capsys):
    folder = str(tmp_path / "run")
    plain = [*TINY, "schedule.epochs=1", "method.name=noise"]
    assert main(["train", *plain, "--out", folder]) == 0
    evaluate = ["eval", "--run", folder, "--etas", "0", "--draws", "1", "--no-progress", "--device", "cpu"]
    assert main(evaluate) == 0
    assert os.listdir(os.path.join(folder, "eval"))
    assert main(["train", *plain, "optim.lr=0.05", "--out", folder, "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(folder, "eval"))
    assert not [n for n in os.listdir(folder) if ".tmp" in n]
    assert main(evaluate) == 0  # not refused with "already exists"


def test_data_that_is_a_file_is_named_as_a_file(tmp_path, capsys):
    f = tmp_path / "cifar.tar.gz"
    f.write_bytes(b"not a folder")
    out = str(tmp_path / "run")
    _fails(capsys, ["train", "--recipe", "cifar-resnet32-kd", "--data", str(f), "--out", out,
                    "teacher.weights=x.pth"], f"data folder {str(f)!r} is a file, not a folder")
    assert not os.path.exists(out)
