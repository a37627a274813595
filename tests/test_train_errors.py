"""Bad input: a clear message (exit status 2) and nothing written or overwritten."""

import contextlib
import os

import pytest
import torch

from fastnoise.cli import main
from fastnoise.train.models import DigitsCNN, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["model.arch=digits_mlp", "teacher.epochs=0", "schedule.epochs=1", "data.batch_size=700",
        "eval.etas=[0.0]", "eval.epoch_draws=0", "--no-progress"]


def _snapshot(root):
    """Every file under root with its bytes (None if root does not exist)."""
    if not os.path.exists(root):
        return None
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _fails(capsys, argv, *fragments):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnoise: error: "), err
    for frag in fragments:
        assert frag in err, f"{frag!r} not in {err!r}"
    return err


def test_missing_data_folder(tmp_path, capsys):
    out = str(tmp_path / "run")
    missing = str(tmp_path / "no-such-folder")
    _fails(capsys, ["train", "--recipe", "cifar-resnet32-kd", "--data", missing, "--out", out,
                    "teacher.weights=x.pth"], f"data folder {missing!r} does not exist")
    assert not os.path.exists(out)
    _fails(capsys, ["train", "--recipe", "imagenet-resnet50-kd", "--out", out],
           "data.root is not set", "--data")
    assert not os.path.exists(out)


def test_imagefolder_class_counts_disagree(tmp_path, capsys):
    from PIL import Image

    for split, classes in (("train", ("a", "b", "c")), ("val", ("a", "b"))):
        for c in classes:
            os.makedirs(tmp_path / "d" / split / c)
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / split / c / "x.jpg")
    _fails(capsys, ["train", "--recipe", "imagenet-resnet50-kd", "--data", str(tmp_path / "d"), "--out",
                    str(tmp_path / "run")], "train/ has 3 classes but val/ has 2")
    assert not os.path.exists(tmp_path / "run")


def test_data_num_classes_disagrees(tmp_path, capsys):
    _fails(capsys, ["train", "--recipe", "digits", "--out", str(tmp_path / "run"), "data.num_classes=5",
                    *TINY], "data.num_classes=5 but the data has 10 classes")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("kind", ["missing", "other-arch", "other-shape", "other-classes", "not-torch"])
def test_teacher_file_errors(kind, tmp_path, capsys):
    path = str(tmp_path / "teacher.pth")
    expected = {
        "missing": [f"teacher file {path!r} does not exist"],
        "other-arch": ["does not match digits_cnn", "key 'conv1.weight' is missing"],
        "other-shape": ["does not match digits_cnn", "conv1.weight has shape (8, 1, 3, 3) in the file, "
                        "(16, 1, 3, 3) in the model"],
        "other-classes": ["has 5 classes", "but the data has 10"],
        "not-torch": ["could not be read as a torch file"],
    }[kind]
    if kind == "other-arch":
        torch.save(build_model("digits_mlp", 10).state_dict(), path)
    elif kind == "other-shape":
        torch.save(DigitsCNN(10, width=8).state_dict(), path)
    elif kind == "other-classes":
        torch.save({"model": build_model("digits_cnn", 5).state_dict()}, path)  # a checkpoint layout
    elif kind == "not-torch":
        with open(path, "w") as f:
            f.write("not a checkpoint")
    out = str(tmp_path / "run")
    _fails(capsys, ["train", "--recipe", "digits", "--out", out, f"teacher.weights={path}", "--no-progress"],
           *expected)
    assert not os.path.exists(out)


def test_kd_without_teacher_and_bad_layers(tmp_path, capsys):
    out = str(tmp_path / "run")
    _fails(capsys, ["train", "--recipe", "digits", "--out", out, "teacher.epochs=0"],
           "method kd needs a teacher", "teacher.weights=FILE")
    _fails(capsys, ["train", "--recipe", "digits", "--out", out, "method.name=consistency", "model.init=null",
                    "method.layers=[fc1, nope]", *TINY], "no module named 'nope'")
    _fails(capsys, ["train", "--recipe", "digits", "--out", out, "optim.lrate=1"], "'optim.lrate'")
    assert not os.path.exists(out)


def test_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    before = _snapshot(out)
    args = ["train", "--recipe", "digits", "--out", out, "method.name=noise", "model.init=null", *TINY]
    _fails(capsys, args, f"run folder {out!r} already exists", "--resume", "--overwrite")
    _fails(capsys, ["train", "--resume", "--out", out], "has no config.yaml")
    assert _snapshot(out) == before

    # --overwrite replaces the run files (and keeps what is not ours); then the run exists
    assert main([*args, "--overwrite", "--device", "cpu"]) == 0
    assert open(os.path.join(out, "notes.txt")).read() == "mine"
    done = _snapshot(out)
    assert "last.pt" in done and "model.pth" in done
    _fails(capsys, args, "already exists")
    _fails(capsys, ["train", "--resume", "--out", out, "optim.lr=0.5"],
           "cannot resume", "optim.lr is 0.002 in its config.yaml, 0.5 now")
    assert _snapshot(out) == done


def test_resume_refuses_a_partial_config_instead_of_filling_in_defaults(tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write("name: digits\n")
    _fails(capsys, ["train", "--resume", "--out", out], "config.yaml is damaged or incomplete", "lacks seed")
    _fails(capsys, ["eval", "--run", out], "config.yaml is damaged or incomplete")
    os.remove(os.path.join(out, "config.yaml"))
    _fails(capsys, ["train", "--resume", "--out", out], "has no config.yaml")


def test_eval_and_demo_refuse_foreign_folders(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x.txt").write_text("keep")
    _fails(capsys, ["demo", "--out", str(out), "--no-progress"], "was not written by the demo")
    weights = str(tmp_path / "w.pth")
    torch.save(build_model("digits_cnn", 10).state_dict(), weights)
    _fails(capsys, ["eval", "--recipe", "digits", "--weights", weights, "--out", str(out), "--no-progress"],
           "already exists")
    assert _snapshot(str(out)) == {"x.txt": b"keep"}
    _fails(capsys, ["eval", "--run", str(tmp_path / "nope")], "no config.yaml")
    _fails(capsys, ["eval", "--recipe", "digits", "--weights", str(tmp_path / "nope.pth"), "--out",
                    str(tmp_path / "e")], "does not exist")
    assert not os.path.exists(tmp_path / "e")


def test_model_init_file_is_checked_before_writing(tmp_path, capsys):
    out = str(tmp_path / "run")
    bad = str(tmp_path / "init.pth")
    torch.save(build_model("digits_cnn", 3).state_dict(), bad)
    _fails(capsys, ["train", "--recipe", "digits", "--out", out, "method.name=noise", f"model.init={bad}"],
           "model.init file", "has 3 classes", "the data has 10")
    _fails(capsys, ["train", "--recipe", "digits", "--out", out, "method.name=noise",
                    f"model.init={tmp_path / 'none.pth'}"], "does not exist")
    assert not os.path.exists(out)


# ------------------------------------------------------------------- every setting, before any write
BASE = ["train", "--recipe", "digits", "method.name=noise", "model.init=null", *TINY]


@pytest.mark.parametrize("extra,fragment", [
    (["schedule.min_lr=1"], "schedule.min_lr=1 is above optim.lr=0.002"),
    (["teacher.lr=1e-6", "schedule.min_lr=1e-4"], "above teacher.lr"),
    (["optim.betas=[0.9, 1.0]"], "optim.betas[1] must be a number in [0, 1)"),
    (["optim.betas=[true, 0.9]"], "optim.betas"),
    (["seed=18446744073709551616"], "seed must be <= 9223372036854775807"),
    (["seed=-1"], "seed must be >= 0"),
    (["data.batch_size=5000"], "data.batch_size=5000 is larger than the training set (1347 samples)"),
    (["name=a/b"], "name must be a non-empty string without path separators"),
    (["name=null"], "name must be"),
    (["data.augment=maybe"], "data.augment must be one of"),
    (["data.skip_unreadable=1"], "data.skip_unreadable"),
    (["teacher.weights=[a]"], "teacher.weights must be null or a path"),
    (["model.arch=resnet32"], "model.arch=resnet32 does not fit the digits data (inputs of shape [1, 8, 8])"),
    (["method.name=kd", "teacher.epochs=1", "teacher.arch=resnet32"], "teacher.arch=resnet32 does not fit"),
    (["--stop-at-step", "0"], "--stop-at-step must be an int >= 1, got 0"),
    (["--stop-at-step", "-3"], "--stop-at-step"),
    (["--device", "bogus"], "--device 'bogus' is not a torch device"),
    (["--device", "cuda:99"], "--device 'cuda:99'"),
    (["--out", ""], "--out is empty"),
], ids=lambda v: v if isinstance(v, str) and "=" not in v[:3] else None)
def test_every_setting_is_checked_before_the_first_byte(extra, fragment, tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = [*BASE, *extra] if "--out" in extra else [*BASE, "--out", out, *extra]
    err = _fails(capsys, argv, fragment)
    assert err.count("\n") == 1, err
    assert not os.path.exists(out)
    assert os.listdir(tmp_path) == []


def test_a_single_class_dataset_is_refused(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        os.makedirs(tmp_path / "d" / split / "only")
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / split / "only" / "x.jpg")
    _fails(capsys, ["train", "--recipe", "imagenet-resnet50-kd", "--data", str(tmp_path / "d"), "--out",
                    str(tmp_path / "run")], "has 1 class(es) ['only']", "at least two")
    assert not os.path.exists(tmp_path / "run")


def test_resume_refuses_a_stop_before_its_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main([*BASE, "--out", out, "--stop-at-step", "1", "--device", "cpu"]) == 0
    _fails(capsys, ["train", "--resume", "--out", out, "--stop-at-step", "1"],
           "--stop-at-step 1 is not after the checkpoint's step 1")


@pytest.mark.parametrize("flags,fragment", [
    (["--etas", "-1"], "--etas must be finite numbers >= 0, got -1.0"),
    (["--etas", "0", "nan"], "--etas must be finite numbers >= 0, got nan"),
    (["--etas", "inf"], "got inf"),
    (["--draws", "0"], "--draws must be >= 1"),
    (["--draws", "x"], "argument --draws: invalid int value: 'x'"),
    (["--device", "nope"], "--device 'nope'"),
])
def test_eval_flags(flags, fragment, tmp_path, capsys):
    weights = str(tmp_path / "w.pth")
    torch.save(build_model("digits_cnn", 10).state_dict(), weights)
    out = str(tmp_path / "e")
    with pytest.raises(SystemExit) if "x" in flags else contextlib.nullcontext() as e:
        code = main(["eval", "--recipe", "digits", "--weights", weights, "--out", out, "--no-progress",
                     *flags])
    if e is not None:
        code = e.value.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnoise: error: ") and fragment in err and err.count("\n") == 1, err
    assert not os.path.exists(out)


def test_demo_checks_its_teacher_run_before_writing(tmp_path, capsys):
    out = str(tmp_path / "demo")
    _fails(capsys, ["demo", "--out", out, "--teacher-epochs", "0"], "the demo's teacher run",
           "schedule.epochs must be >= 1")
    _fails(capsys, ["demo", "--out", out, "--seed", "-2"], "seed must be >= 0")
    assert not os.path.exists(out)


def test_unwritable_run_folder_and_interrupt_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    _fails(capsys, [*BASE, "--out", str(tmp_path / "file" / "run")], "cannot create run folder")
    import fastnoise.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_recipes", interrupted)
    assert main(["recipes"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("fastnoise: interrupted") and "--resume" in err and "Traceback" not in err


def test_a_noise_level_that_diverges_is_named(tmp_path, capsys):
    out = str(tmp_path / "run")
    err = _fails(capsys, [*BASE, "--out", out, "noise.eta=1e30", "data.batch_size=256", "log.every=1",
                          "--device", "cpu"],
                 "training diverged at step 1 (epoch 1)",
                 "Likely cause: noise.eta=1e+30 (range scale) is too large")
    assert err.count("\n") == 1
    assert not os.path.exists(os.path.join(out, "last.pt"))
