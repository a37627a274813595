"""The fastnoise command: the demo on a reduced budget, listing recipes, argument handling."""

import csv
import os
from importlib import metadata

import pytest

from fastnoise.cli import main
from fastnoise.train.demo import DEMO_ETAS

pytestmark = pytest.mark.usefixtures("one_thread")


METHODS = ["teacher", "clean", "noise", "kd", "consistency"]


@pytest.mark.slow
def test_demo_reduced_budget(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--device", "cpu", "--out", out, "--epochs", "2", "--teacher-epochs", "4",
                 "--draws", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| eta | teacher | clean | noise | kd | consistency |" in text
    assert "mean ± std over 3 noise draws" in text
    for name in ("robustness.csv", "robustness.png", "table.md", "demo.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert open(os.path.join(out, "robustness.png"), "rb").read(4) == b"\x89PNG"
    for m in METHODS:
        assert os.path.isfile(os.path.join(out, m, "model.pth")), m

    rows = list(csv.DictReader(open(os.path.join(out, "robustness.csv"))))
    assert [r["name"] for r in rows] == [m for m in METHODS for _ in DEMO_ETAS]
    assert [float(r["eta"]) for r in rows[:6]] == list(DEMO_ETAS)
    res = {(r["name"], float(r["eta"])): r for r in rows}
    for r in rows:
        assert 0.0 <= float(r["min"]) <= float(r["mean"]) <= float(r["max"]) <= 100.0
        assert int(r["draws"]) == (1 if float(r["eta"]) == 0 else 3)
    assert float(res[("teacher", 0.0)]["mean"]) > 80.0  # chance is 10%
    assert float(res[("teacher", 0.0)]["std"]) == 0.0
    for m in METHODS:  # noise hurts: eta 0.1 is no better than the clean pass, with spread over chips
        assert float(res[(m, 0.1)]["mean"]) <= float(res[(m, 0.0)]["mean"]) + 1.0
        assert float(res[(m, 0.1)]["std"]) > 0.0

    assert f"[demo] writing into {out} (a later demo into it replaces it)" in text
    # a second demo into its own folder replaces it, and says so
    assert main(["demo", "--device", "cpu", "--out", out, "--epochs", "1", "--teacher-epochs", "1",
                 "--draws", "2", "--methods", "noise", "--no-progress"]) == 0
    assert f"[demo] replacing {out}: it holds an earlier demo's output" in capsys.readouterr().out
    rows = list(csv.DictReader(open(os.path.join(out, "robustness.csv"))))
    assert {r["name"] for r in rows} == {"teacher", "noise"}


@pytest.mark.slow
def test_demo_is_deterministic(tmp_path, capsys):
    args = ["--device", "cpu", "--epochs", "1", "--teacher-epochs", "1", "--draws", "2", "--methods", "kd",
            "--no-progress"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["demo", "--out", a, *args]) == 0
    assert main(["demo", "--out", b, *args]) == 0
    assert open(os.path.join(a, "robustness.csv")).read() == open(os.path.join(b, "robustness.csv")).read()
    c = str(tmp_path / "c")
    assert main(["demo", "--out", c, "--seed", "1", *args]) == 0
    assert open(os.path.join(a, "robustness.csv")).read() != open(os.path.join(c, "robustness.csv")).read()


def test_recipes_command(capsys):
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out.split() == ["cifar-resnet32-consistency", "cifar-resnet32-kd", "digits",
                                               "fashion-mnist-consistency", "fashion-mnist-kd",
                                               "fashion-mnist-noise", "imagenet-resnet50-consistency",
                                               "imagenet-resnet50-kd", "licenses-llama"]


def test_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", "--overwrite", "--out", "x"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "train needs --recipe" in capsys.readouterr().err
    assert main(["demo", "--draws", "0", "--out", "unused-folder"]) == 2
    assert "--draws" in capsys.readouterr().err
    assert not os.path.exists("unused-folder")


def test_console_script_is_declared():
    eps = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "fastnoise"]
    assert eps and eps[0].value == "fastnoise.cli:main"
