"""A truncated, corrupt or edited copy of each file a run reads: the run either repairs what it
can rebuild (logs, metrics, config.yaml from last.pt) and finishes as an uninterrupted run, or
stops with one ``fastnoise: error:`` line naming the file, leaving the folder as it was."""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from _fault_harness import RESUME, RUN, assert_same_run, read_bytes

from fastnoise.cli import main
from fastnoise.train import runfolder as rf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run stopped at step 8 (epoch 1 done, best.pt written)."""
    root = tmp_path_factory.mktemp("runs")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*RUN, "--out", str(root / "full")]) == 0
        assert main([*RUN, "--out", str(root / "stopped"), "--stop-at-step", "8"]) == 0
    finally:
        torch.set_num_threads(n)
    return str(root / "full"), str(root / "stopped")


def _copy(src, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _snapshot(folder):
    return {n: read_bytes(os.path.join(folder, n)) for n in rf.user_entries(folder)}


def _half(path):
    data = read_bytes(path)
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def _nan_weight(path):
    state = torch.load(path, weights_only=True)
    state["model"]["fc.weight"][0, 0] = float("nan")
    torch.save(state, path)


def _other_lr(path):
    text = open(path).read()
    assert "lr: 0.002" in text
    open(path, "w").write(text.replace("lr: 0.002", "lr: 0.5", 1))


def _plain_state_dict(path):
    torch.save(torch.load(path, weights_only=True)["model"], path)


REFUSED = {
    "config-truncated": ("config.yaml", _half, ["config.yaml"]),
    "config-empty": ("config.yaml", lambda p: _write(p, b""), ["config.yaml", "must be a mapping"]),
    "config-binary": ("config.yaml", lambda p: _write(p, bytes(range(256))), ["config.yaml", "not a YAML"]),
    "config-edited": ("config.yaml", _other_lr,
                      ["config.yaml does not match", "optim.lr is 0.5 in config.yaml", "0.002 in last.pt"]),
    "last-truncated": ("last.pt", _half, ["last.pt", "could not be read as a torch file"]),
    "last-garbage": ("last.pt", lambda p: _write(p, b"\x00" * 4096), ["last.pt", "could not be read"]),
    "last-not-a-checkpoint": ("last.pt", _plain_state_dict, ["last.pt", "is not a fastnoise run checkpoint"]),
    "last-nan": ("last.pt", _nan_weight, ["last.pt", "non-finite", "fc.weight"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_damaged_file_that_cannot_be_rebuilt_is_named(case, runs, tmp_path, capsys):
    name, damage, fragments = REFUSED[case]
    folder = _copy(runs[1], tmp_path)
    damage(os.path.join(folder, name))
    before = _snapshot(folder)
    for argv in ([*RESUME, "--out", folder], ["eval", "--run", folder, "--no-progress", "--device", "cpu"]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastnoise: error: ") and err.count("\n") == 1, err
        for frag in fragments:
            assert frag in err, f"{frag!r} not in {err!r}"
        assert _snapshot(folder) == before


def _tear_steps(path):
    text = open(path).read()
    _write(path, (text + "9,1,2.2").encode())  # a row cut short (no newline), past the checkpoint


def _glue_steps(path):
    text = open(path).read()
    _write(path, (text + "10,1,2.23\x00\xff,0.1\n12,1,oops\n").encode())


REBUILT = {
    "config-deleted": ("config.yaml", os.remove, "written again from last.pt"),
    "metrics-json-truncated": ("metrics.json", _half, None),
    "metrics-json-deleted": ("metrics.json", os.remove, None),
    "metrics-csv-garbage": ("metrics.csv", lambda p: _write(p, b"\xff\xfe garbage\n1,2,3"), None),
    "steps-torn": ("steps.csv", _tear_steps, "dropped 1 row"),
    "steps-garbage": ("steps.csv", _glue_steps, "dropped 2 row"),
    "best-truncated": ("best.pt", _half, "does not hold the best epoch"),
    "stray-temps": (".last.pt.tmp-4242", lambda p: _write(p, b"half a checkpoint"), "removed 2 temporary"),
}


@pytest.mark.parametrize("case", list(REBUILT))
def test_a_damaged_file_that_can_be_rebuilt_is_and_the_run_ends_as_if_untouched(case, runs, tmp_path, capsys):
    name, damage, message = REBUILT[case]
    folder = _copy(runs[1], tmp_path)
    if case == "stray-temps":
        _write(os.path.join(folder, "last.pt.tmp999"), b"an older version's temporary file")
        damage(os.path.join(folder, name))
    else:
        damage(os.path.join(folder, name))
    capsys.readouterr()
    assert main([*RESUME, "--out", folder]) == 0
    out = capsys.readouterr()
    if message is not None:
        assert message in out.out + out.err
    assert_same_run(folder, runs[0])


@pytest.mark.slow
def test_lost_log_rows_are_reported_not_invented(runs, tmp_path, capsys):
    folder = _copy(runs[1], tmp_path)
    path = os.path.join(folder, "steps.csv")
    lines = open(path).read().splitlines(keepends=True)
    assert [ln.split(",")[0] for ln in lines] == ["step", "2", "4", "5", "6", "8"]
    _write(path, "".join(lines[:2] + lines[3:]).encode())  # the step-4 row is gone
    capsys.readouterr()
    assert main([*RESUME, "--out", folder]) == 0
    assert "has 4 of the 5 rows up to step 8" in capsys.readouterr().out
    ref = open(os.path.join(runs[0], "steps.csv")).read().splitlines(keepends=True)
    assert open(path).read() == "".join(ref[:2] + ref[3:])


def test_eval_names_a_damaged_model_file(runs, tmp_path, capsys):
    folder = _copy(runs[0], tmp_path)
    _half(os.path.join(folder, "model.pth"))
    capsys.readouterr()
    assert main(["eval", "--run", folder, "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnoise: error: weights file") and "model.pth" in err
    assert "could not be read" in err


def test_a_damaged_teacher_file_is_named(tmp_path, capsys):
    """A KD run whose clean teacher was trained in RUN/teacher: its model.pth is what resume reads."""
    folder = str(tmp_path / "kd")
    kd = [*RUN[:6], "model.arch=digits_mlp", "method.name=kd", "teacher.epochs=1", "data.batch_size=256",
          "schedule.epochs=1", "eval.etas=[0.0]", "eval.epoch_draws=0"]
    assert main([*kd, "--out", folder, "--stop-at-step", "2"]) == 0
    teacher = os.path.join(folder, "teacher", "model.pth")
    _half(teacher)
    capsys.readouterr()
    assert main([*RESUME, "--out", folder]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastnoise: error: teacher file {teacher!r} could not be read"), err
    shutil.copy(teacher, tmp_path / "t.pth")  # the same damage in a teacher.weights file
    capsys.readouterr()
    assert main([*kd, "--out", str(tmp_path / "kd2"), f"teacher.weights={tmp_path / 't.pth'}"]) == 2
    assert "t.pth" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "kd2")


def _write_cifar(root, n=4):
    g = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": g.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in g.integers(0, 10, n)]}, f)
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


@pytest.mark.parametrize("name,damage", [("data_batch_3", _half), ("batches.meta", _half),
                                         ("test_batch", lambda p: _write(p, b"not a pickle at all")),
                                         ("data_batch_1", lambda p: _write(p, pickle.dumps([1, 2])))])
def test_a_damaged_cifar_batch_is_named(name, damage, tmp_path, capsys):
    root = str(tmp_path / "cifar")
    _write_cifar(root)
    damage(os.path.join(root, name))
    out = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--recipe", "cifar-resnet32-kd", "--data", root, "--out", out,
                 "teacher.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnoise: error: ") and name in err and "CIFAR-10 python batch" in err, err
    assert not os.path.exists(out)


def test_damaged_recipe_and_init_files_are_named(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"name: x\n\xff\xfe\x00")
    capsys.readouterr()
    assert main(["train", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "r.yaml: not a YAML text file" in capsys.readouterr().err
    init = tmp_path / "init.pth"
    torch.save({"fc.weight": torch.zeros(3)}, init)
    _half(str(init))
    assert main([*RUN, "--out", str(tmp_path / "run"), f"model.init={init}"]) == 2
    err = capsys.readouterr().err
    assert "model.init file" in err and "init.pth" in err and "could not be read" in err
    assert not os.path.exists(tmp_path / "run")


def _image_folder(root, bad: dict):
    from PIL import Image

    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            d = os.path.join(root, split, c)
            os.makedirs(d)
            for i in range(3):
                pixels = g.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(d, f"{i}.jpg"))
    for rel, damage in bad.items():
        damage(os.path.join(root, rel))


@pytest.mark.slow
def test_a_corrupt_jpeg_is_named_and_can_be_skipped(tmp_path, capfd):
    """capfd: the warning comes from the DataLoader worker process, on file descriptor 2."""
    root = str(tmp_path / "images")
    _image_folder(root, {"train/bee/1.jpg": lambda p: _write(p, b"\xff\xd8\xff\xe0 not really a jpeg"),
                         "train/ant/2.jpg": _half})  # a truncated one
    out = str(tmp_path / "run")
    args = [*RUN[:6], "data.dataset=imagefolder", f"data.root={root}", "data.image_size=8",
            "model.arch=resnet32", "method.name=clean", "model.init=null", "teacher.epochs=0",
            "data.batch_size=2", "schedule.epochs=1", "eval.etas=[0.0]", "eval.epoch_draws=0", "log.every=1",
            "data.workers=1"]  # the error comes through a worker process, which does not keep the lock
    capfd.readouterr()
    assert main([*args, "--out", out]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastnoise: error: cannot read image "), err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert ("bee/1.jpg" in err or "ant/2.jpg" in err) and "data.skip_unreadable=true" in err, err
    # the folder is resumable, with the option that skips such files (a setting a resume may change)
    assert main([*RESUME, "--out", out, "data.skip_unreadable=true"]) == 0
    err = capfd.readouterr().err
    for name in ("bee/1.jpg", "ant/2.jpg"):
        assert "fastnoise: warning: skipped unreadable data (data.skip_unreadable): cannot read image " in err
        assert name in err, err
    assert os.path.isfile(os.path.join(out, "model.pth"))


@pytest.mark.slow
def test_resume_on_other_data_is_refused(tmp_path, capsys):
    """data.root may move on resume (it is where the data lives), not become other data."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write_cifar(a, n=4)
    _write_cifar(b, n=6)
    out = str(tmp_path / "run")
    args = ["train", "--recipe", "cifar-resnet32-kd", "--no-progress", "--device", "cpu", "method.name=clean",
            "model.init=null", "data.batch_size=4", "schedule.epochs=1", "eval.etas=[0.0]",
            "eval.epoch_draws=0", "data.workers=0"]
    assert main([*args, "--data", a, "--out", out, "--stop-at-step", "2"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*RESUME, "--out", out, "--data", b]) == 2
    err = capsys.readouterr().err
    assert "has 30 training and 6 validation samples" in err and "trained on 20 and 4" in err, err
    assert _snapshot(out) == before
    shutil.move(a, str(tmp_path / "moved"))
    assert main([*RESUME, "--out", out, "--data", str(tmp_path / "moved")]) == 0
