"""What a newcomer trips on (issue 22, item 4): ``fastnoise recipes NAME``, close keys suggested,
Python errors naming Python arguments, the clean -> noise chain of ``fit``, ``fit(verbose=)``,
progress without carriage returns off a terminal, ``--help`` without torch, ``eval --run`` as the
pass at the end of ``train``."""

import copy
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from _fit_worker import make_data, make_model

import fastnoise
from fastnoise.cli import main
from fastnoise.convert import noisy_layers
from fastnoise.progress import PlainProgress
from fastnoise.train import ConfigError, fit
from fastnoise.train.recipes import DEFAULTS, setting_keys

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = {"epochs": 1, "batch_size": 64, "eval": {"etas": [0.0, 0.1], "draws": 2, "epoch_draws": 0},
         "log": {"progress": False}}


def test_help_and_recipes_answer_without_importing_torch():
    code = ("import sys\nfrom fastnoise.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "main(['recipes', 'digits'])\n"
            "print('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "docs/cli.md" in out.stdout  # --help says where the keys are documented
    assert out.stdout.strip().endswith("TORCH False")


def test_package_names_load_on_first_use():
    import fastnoise.convert  # noqa: F401  (binds the submodule: the name must stay the function)

    assert callable(fastnoise.convert) and fastnoise.convert.__name__ == "convert"
    assert fastnoise.functional.__name__ == "fastnoise.functional"
    assert fastnoise.pregenerate.__name__ == "fastnoise.pregenerate"  # submodules, as before
    assert set(fastnoise.__all__) <= set(dir(fastnoise))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastnoise.nope  # noqa: B018


def test_recipes_name_prints_every_setting_and_its_file(capsys, tmp_path):
    assert main(["recipes", "digits"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# ") and lines[0].endswith(os.path.join("recipes", "digits.yaml"))
    assert os.path.isfile(lines[0][2:])
    settings = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in lines if not line.startswith("#")}
    assert list(settings) == setting_keys(DEFAULTS)
    assert settings["schedule.epochs"].startswith("15") and "set by the recipe" in settings["schedule.epochs"]
    assert settings["data.root"] == "null" and settings["log.every"] == "10"
    # a YAML file too; an unknown name lists the shipped ones
    f = tmp_path / "mine.yaml"
    f.write_text("schedule:\n  epochs: 3\n")
    assert main(["recipes", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"# {f}" in out and "schedule.epochs=3" in out
    assert main(["recipes", "nope"]) == 2
    assert "shipped recipes: " in capsys.readouterr().err


def test_an_unknown_key_suggests_the_close_ones(capsys, tmp_path):
    assert main(["train", "--recipe", "digits", "--out", str(tmp_path / "r"), "schedule.epoch=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown configuration key 'schedule.epoch'; did you mean schedule.epochs" in err
    assert err.count("\n") == 1
    assert main(["train", "--recipe", "digits", "--out", str(tmp_path / "r"), "epochs=2"]) == 2
    assert "schedule.epochs" in capsys.readouterr().err
    f = tmp_path / "typo.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    assert main(["recipes", str(f)]) == 2
    assert "did you mean optim.lr" in capsys.readouterr().err
    train, val = make_data()
    with pytest.raises(ConfigError, match="did you mean method.temperature"):
        fit(make_model(), train, val, method={"name": "noise", "temperatur": 2.0}, **QUICK)
    with pytest.raises(ConfigError, match="'foo'$|'foo' \\("):  # nothing close: no guess
        fit(make_model(), train, val, foo=1, **QUICK)


def test_python_calls_name_python_arguments_and_the_cli_its_flags(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    train, val = make_data()
    with pytest.raises(ConfigError) as e:
        fit(make_model(), train, val, out_dir=str(busy), **QUICK)
    assert "pass resume=True to continue it or overwrite=True to replace it" in str(e.value)
    assert "--" not in str(e.value)
    with pytest.raises(ConfigError, match="^stop_at_step must be an int >= 1, got 0"):
        fit(make_model(), train, val, out_dir=str(tmp_path / "new"), stop_at_step=0, **QUICK)
    # the command keeps its flags
    assert main(["train", "--recipe", "digits", "--out", str(busy)]) == 2
    assert "pass --resume to continue it or --overwrite to replace it" in capsys.readouterr().err
    assert main(["train", "--recipe", "digits", "--out", str(tmp_path / "n"), "--stop-at-step", "0"]) == 2
    assert "--stop-at-step must be an int >= 1" in capsys.readouterr().err


def test_a_clean_model_from_fit_goes_on_to_a_noise_run_with_its_spec():
    train, val = make_data()
    lines = []
    clean = fit(make_model(), train, val, method="clean", messages=lines.append, **QUICK)
    header = lines[0]
    assert "no noise" in header and "NoiseSpec" not in header  # a clean run trains without noise
    ids = {n: m.noise_key for n, m in noisy_layers(clean.model)}
    assert ids and all(m.spec.eta == 0.06 for _, m in noisy_layers(clean.model))
    student = copy.deepcopy(clean.model)
    # a run that is refused (kd without a teacher) leaves the specs as they were
    with pytest.raises(ConfigError, match="needs a teacher"):
        fit(student, train, val, method="kd", spec=fastnoise.NoiseSpec(0.08), messages=lines.append, **QUICK)
    assert all(m.spec.eta == 0.06 for _, m in noisy_layers(student))
    lines.clear()
    noisy = fit(student, train, val, method="noise", spec=fastnoise.NoiseSpec(0.08), messages=lines.append,
                **QUICK)
    assert noisy.model is student
    assert {n: m.spec for n, m in noisy_layers(student)} == {n: fastnoise.NoiseSpec(0.08) for n in ids}
    assert {n: m.noise_key for n, m in noisy_layers(student)} == ids  # the same noisy layers
    assert "eta=0.08" in lines[0]
    # without spec the layers keep their own
    again = fit(copy.deepcopy(student), train, val, method="noise", messages=lines.append, **QUICK)
    assert all(m.spec.eta == 0.08 for _, m in noisy_layers(again.model))
    with pytest.raises(ConfigError, match="noise.exclude"):
        fit(copy.deepcopy(student), train, val, noise={"exclude": ["head"]}, **QUICK)


def test_fit_prints_its_table_once_and_nothing_when_not_verbose(capsys):
    train, val = make_data()
    r = fit(make_model(), train, val, verbose=False, **QUICK)
    assert capsys.readouterr() == ("", "")
    assert r.robustness is not None and "| eta | draws |" in r.robustness.table()
    fit(make_model(), train, val, **QUICK)
    out = capsys.readouterr().out
    assert out.count("| eta | draws |") == 1 and "epoch 1/1" in out
    with pytest.raises(ConfigError, match="verbose must be True or False"):
        fit(make_model(), train, val, verbose="no", **QUICK)


def test_progress_off_a_terminal_is_a_few_plain_lines(capsys):
    train, val = make_data()
    settings = {**QUICK, "epochs": 6, "batch_size": 8, "log": {"progress": True, "every": 1}}
    fit(make_model(), train, val, **settings)  # 6 x 32 = 192 steps, 3 robustness passes
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    steps = [x for x in lines if x.startswith("fit: ")]
    assert 5 <= len(steps) <= 11, lines
    assert steps[-1].startswith("fit: 192/192 (100%)") and "loss=" in steps[-1]
    assert len(lines) <= 11 + 4, lines


def test_plain_progress_writes_a_line_a_tenth():
    buf = io.StringIO()
    bar = PlainProgress(700, "demo", stream=buf)
    for _ in range(700):
        bar.update(1)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10 and lines[0] == "demo: 70/700 (10%)" and lines[-1] == "demo: 700/700 (100%)"
    buf = io.StringIO()
    bar = PlainProgress(5, "x", initial=2, stream=buf)  # a resumed run counts from where it was
    bar.update(3)
    assert buf.getvalue() == "x: 5/5 (100%)\n"


def test_eval_run_is_the_pass_at_the_end_of_train(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    args = ["train", "--recipe", "digits", "--out", out, "--device", "cpu", "--no-progress",
            "method.name=noise", "model.init=null", "teacher.epochs=0", "schedule.epochs=1",
            "eval.etas=[0,0.1]", "eval.draws=2", "eval.epoch_draws=0", "model.channels_last=true"]
    assert main(args) == 0
    capsys.readouterr()
    import fastnoise.robustness as robustness

    seen = {}
    evaluate = robustness.evaluate_robustness

    def spy(model, *args, **kw):
        seen["channels_last"] = kw.get("channels_last")
        seen["weight"] = model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
        return evaluate(model, *args, **kw)

    monkeypatch.setattr(robustness, "evaluate_robustness", spy)
    assert main(["eval", "--run", out, "--no-progress"]) == 0
    assert seen == {"channels_last": True, "weight": True}  # the run's memory format
    ran, evaluated = (os.path.join(out, *p, "robustness.csv") for p in ((), ("eval",)))
    with open(ran) as a, open(evaluated) as b:
        assert a.read() == b.read()  # the same chips as the table at the end of train
    assert len(json.load(open(os.path.join(out, "metrics.json")))) == 1
