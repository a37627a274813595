"""Every shipped recipe end to end for a few steps on a tiny generated dataset in its real layout
(CIFAR-10 python pickles; an ImageFolder of JPEGs): train, stop, resume, robustness table.

CPU budget: the ImageNet recipes keep torchvision's ResNet-50 but use 32x32 crops, and noise
only in the stem and layer1 (the CPU reference draws ~0.3 s of noise per million weights; the
full model is the GPU test's job).
"""

import csv
import os
import pickle

import numpy as np
import pytest
import torch

import fastnoise
from fastnoise.cli import main
from fastnoise.train.models import build_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


QUICK = ["--no-progress", "schedule.epochs=1", "eval.etas=[0.0, 0.1]", "eval.draws=2", "eval.epoch_draws=1",
         "log.every=1", "data.workers=0"]


def _write_cifar(root, n_per_batch=4, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(),
             b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, classes, n_per_batch)]}
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(d, f)
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(classes)], b"num_vis": 3072}, f)


def _write_imagefolder(root, classes=("ant", "bee", "cat"), train=4, val=2, size=40, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"{c}_{i}.JPEG"), quality=90)


def _save_teacher(arch, classes, path):
    with torch.random.fork_rng():
        torch.manual_seed(123)
        torch.save(build_model(arch, classes).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    _write_cifar(str(root / "cifar-10-batches-py"))
    teacher = _save_teacher("resnet32", 10, str(root / "resnet32.pth"))
    return str(root / "cifar-10-batches-py"), teacher


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    _write_imagefolder(str(root / "data"))
    teacher = _save_teacher("resnet50", 3, str(root / "resnet50.pth"))
    return str(root / "data"), teacher


def _rows(path, drop=()):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def _check_run(out, steps, etas=(0.0, 0.1), noisy_val=True):
    for name in ("config.yaml", "last.pt", "model.pth", "steps.csv", "metrics.csv", "metrics.json",
                 "robustness.csv", "robustness.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert [int(r["step"]) for r in _rows(os.path.join(out, "steps.csv"))] == list(range(1, steps + 1))
    rob = _rows(os.path.join(out, "robustness.csv"))
    assert [float(r["eta"]) for r in rob] == list(etas)
    assert [int(r["draws"]) for r in rob] == [1] + [2] * (len(etas) - 1)
    for r in rob:
        assert 0.0 <= float(r["mean"]) <= 100.0
    metrics = _rows(os.path.join(out, "metrics.csv"))
    assert len(metrics) == 1 and np.isfinite(float(metrics[0]["train_loss"]))
    assert ("val_top1_noisy" in metrics[0]) == noisy_val


def _train(*args, device="cpu"):
    """``fastnoise train`` on the CPU (also on a GPU machine: the exact-equality checks rely on
    the CPU's deterministic kernels); GPU tests pass ``device="cuda"``."""
    assert main(["train", *args, "--device", device]) == 0


def _cifar_args(recipe, data, teacher):
    return ["--recipe", recipe, "--data", data, f"teacher.weights={teacher}", "data.batch_size=10",
            "data.eval_batch_size=4", *QUICK]


def test_cifar_kd_recipe_resume_and_eval(cifar, tmp_path, capsys):
    data, teacher = cifar
    args = _cifar_args("cifar-resnet32-kd", data, teacher)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    _train(*args, "--out", full)
    _train(*args, "--out", split, "--stop-at-step", "1")
    assert not os.path.exists(os.path.join(split, "robustness.csv"))
    _train("--resume", "--out", split, "--no-progress")
    _check_run(split, steps=2)
    # in one process (same threads) the resumed run is exactly the uninterrupted one
    assert _rows(os.path.join(split, "steps.csv")) == _rows(os.path.join(full, "steps.csv"))
    assert _rows(os.path.join(split, "robustness.csv")) == _rows(os.path.join(full, "robustness.csv"))
    ck = torch.load(os.path.join(split, "last.pt"), weights_only=True)
    assert len(ck["noise"]) == 32  # 31 convs + fc, all noisy
    assert all(s["calls"] == 2 for s in ck["noise"].values())

    # fastnoise eval on the run folder reproduces its table (same seed, same layer ids)
    capsys.readouterr()
    assert main(["eval", "--run", full, "--no-progress", "--device", "cpu"]) == 0
    assert "| 0.1 | 2 |" in capsys.readouterr().out
    assert _rows(os.path.join(full, "eval", "robustness.csv")) == _rows(os.path.join(full, "robustness.csv"))
    # and from the recipe and a weights file, with other etas
    ev = str(tmp_path / "ev")
    assert main(["eval", "--recipe", "cifar-resnet32-kd", "--data", data, "--weights",
                 os.path.join(full, "model.pth"), "--etas", "0", "0.05", "--draws", "3", "--out", ev,
                 "--no-progress", "data.workers=0", "data.eval_batch_size=4", "--device", "cpu"]) == 0
    rows = _rows(os.path.join(ev, "robustness.csv"))
    assert [r["eta"] for r in rows] == ["0.0", "0.05"] and rows[1]["draws"] == "3"


def test_cifar_consistency_recipe(cifar, tmp_path):
    data, teacher = cifar
    out = str(tmp_path / "run")
    _train(*_cifar_args("cifar-resnet32-consistency", data, teacher), "--out", out, "--stop-at-step", "1")
    _train("--resume", "--out", out, "--no-progress")
    _check_run(out, steps=2)
    metrics = _rows(os.path.join(out, "metrics.csv"))
    assert float(metrics[0]["train_consistency"]) > 0


@pytest.mark.parametrize("recipe", ["imagenet-resnet50-kd", "imagenet-resnet50-consistency"])
def test_imagenet_recipes(recipe, imagenet, tmp_path):
    data, teacher = imagenet
    out = str(tmp_path / "run")
    args = ["--recipe", recipe, "--data", data, f"teacher.weights={teacher}", "data.image_size=32",
            "data.val_resize=36", "data.batch_size=6", "data.eval_batch_size=6",
            "noise.exclude=[layer2.*, layer3.*, layer4.*, fc]", *QUICK, "eval.epoch_draws=0"]
    _train(*args, "--out", out, "--stop-at-step", "1")
    _train("--resume", "--out", out, "--no-progress")
    _check_run(out, steps=2, noisy_val=False)
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert set(ck["noise"]) == {"conv1"} | {f"layer1.{b}.{c}" for b in range(3)
                                             for c in ("conv1", "conv2", "conv3")} | {"layer1.0.downsample.0"}
    state = torch.load(os.path.join(out, "model.pth"), weights_only=True)
    assert state["fc.weight"].shape == (3, 2048)  # torchvision layout, the data's 3 classes
    import torchvision

    torchvision.models.resnet50(num_classes=3).load_state_dict(state)


def test_digits_recipe(tmp_path):
    out = str(tmp_path / "run")
    _train("--recipe", "digits", "--out", out, "teacher.epochs=1", "data.batch_size=700", *QUICK,
           "--stop-at-step", "1")
    _train("--resume", "--out", out, "--no-progress")
    _check_run(out, steps=1)  # one step an epoch: stopped after it, the resume writes the epoch
    assert os.path.isfile(os.path.join(out, "teacher", "model.pth"))  # trained first, in RUN/teacher
    assert fastnoise.initial_seed() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["imagenet-resnet50-kd", "imagenet-resnet50-consistency"])
def test_imagenet_recipes_full_model_gpu(recipe, imagenet, tmp_path):
    """On a GPU: the whole ResNet-50 noisy, 224 crops, bf16 autocast and channels_last."""
    data, teacher = imagenet
    out = str(tmp_path / "run")
    _write_imagefolder(os.path.join(str(tmp_path), "big"), size=256, train=8, val=4)
    _train("--recipe", recipe, "--data", os.path.join(str(tmp_path), "big"), f"teacher.weights={teacher}",
           "data.batch_size=12", "data.eval_batch_size=12", "--out", out, *QUICK, device="cuda")
    _check_run(out, steps=2)


def test_resume_a_run_interrupted_after_its_teacher(tmp_path):
    """Killed after the teacher was trained but before the student's first checkpoint."""
    args = ["--recipe", "digits", "model.arch=digits_mlp", "teacher.epochs=1", "data.batch_size=400", *QUICK]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    _train(*args, "--out", full)
    _train(*args, "--out", cut, "--stop-at-step", "1")
    for name in ("last.pt", "steps.csv"):
        os.remove(os.path.join(cut, name))
    _train("--resume", "--out", cut, "--no-progress")
    _check_run(cut, steps=3)
    assert _rows(os.path.join(cut, "steps.csv")) == _rows(os.path.join(full, "steps.csv"))
