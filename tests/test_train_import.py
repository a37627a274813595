"""Recipes that name the user's own model and dataset by import path (``package.module:function``):
trained end to end, derived classifier / convnet facts, clear errors, and no hooks left behind."""

import csv
import itertools
import os
import textwrap

import pytest
import torch

import fastnoise
from fastnoise.cli import main
from fastnoise.train import models as M
from fastnoise.train.data import build_data
from fastnoise.train.recipes import ConfigError, resolve
from fastnoise.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

_counter = itertools.count()

USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class Net(nn.Module):
    """The user's model: its logits come out of a layer called "head", not "fc"."""

    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.hidden = nn.Linear(4 * 16, 12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.head(torch.relu(self.hidden(x)))


def build(num_classes):
    return Net(num_classes)


class MLP(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.a = nn.Linear(64, 10)   # 10 outputs too: the classifier is still the last one
        self.b = nn.Linear(10, num_classes)

    def forward(self, x):
        return self.b(torch.relu(self.a(x.flatten(1))))


def build_mlp(num_classes):
    return MLP(num_classes)


def build_declared(num_classes):
    return MLP(num_classes)


build_declared.classifier = "a"
build_declared.convnet = True


def _split(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    x[:, 0, :2, :] += 2.0 * y[:, None, None].float()  # learnable: the label is written in rows 0-1
    return TensorDataset(x, y)


def data(settings):
    assert settings["batch_size"] >= 1           # the data section of the run
    return _split(96, 0), _split(30, 1)


class Flip(torch.utils.data.Dataset):
    """Augmentation through torch's RNG: resumes exactly (each sample's draw is seeded)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), int(y)


def data_augmented(settings):
    from fastnoise.train.data import DataBundle

    return DataBundle(Flip(_split(96, 0)), _split(30, 1), 3, ["a", "b", "c"])


def not_a_model(num_classes):
    return "a string"


def not_data(settings):
    return [1, 2, 3]


def bad_samples(settings):
    return [torch.zeros(3)] * 4, [torch.zeros(3)] * 4


LIST = [1, 2]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module written into tmp_path, importable (tmp_path on sys.path); a fresh name each test."""
    name = f"fn_user_{os.getpid()}_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _recipe(tmp_path, mod, **extra):
    text = textwrap.dedent(f"""\
        name: mine
        data:
          dataset: {mod}:data
          batch_size: 16
          eval_batch_size: 32
        model:
          arch: {mod}:build
          init: teacher
        teacher:
          epochs: 3
        method:
          name: kd
          layers: [stem, hidden]
        noise:
          eta: 0.05
        optim:
          name: adamw
          lr: 0.02
        schedule:
          epochs: 2
        eval:
          etas: [0.0, 0.05]
          draws: 2
          epoch_draws: 1
        log:
          every: 1
          progress: false
        """)
    for k, v in extra.items():
        text += f"{k}: {v}\n"
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_import_path_model_and_data_trained_end_to_end(tmp_path, user_module, capsys):
    recipe = _recipe(tmp_path, user_module)
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    base = ["train", "--recipe", recipe, "--device", "cpu"]
    assert main([*base, "--out", full]) == 0
    metrics = _rows(os.path.join(full, "metrics.csv"))
    assert len(metrics) == 2 and float(metrics[-1]["val_top1"]) > 60.0  # 3 classes: chance is 33%
    state = torch.load(os.path.join(full, "model.pth"), weights_only=True)
    assert state["head.weight"].shape == (3, 12)  # the data's 3 classes (TensorDataset targets)
    ck = torch.load(os.path.join(full, "last.pt"), weights_only=True)
    assert set(ck["noise"]) == {"stem", "hidden", "head"}
    # exact resume: 12 steps, stopped at 7
    assert main([*base, "--out", split, "--stop-at-step", "7"]) == 0
    assert main(["train", "--resume", "--out", split, "--device", "cpu", "--no-progress"]) == 0
    assert _rows(os.path.join(split, "steps.csv")) == _rows(os.path.join(full, "steps.csv"))
    assert _rows(os.path.join(split, "robustness.csv")) == _rows(os.path.join(full, "robustness.csv"))
    # fastnoise eval of the run (the CLI's model registry knows the import path)
    capsys.readouterr()
    assert main(["eval", "--run", full, "--no-progress", "--device", "cpu"]) == 0
    assert _rows(os.path.join(full, "eval", "robustness.csv")) == _rows(os.path.join(full, "robustness.csv"))


@pytest.mark.slow
def test_augmented_user_dataset_resumes_exactly(tmp_path, user_module):
    recipe = _recipe(tmp_path, user_module)
    over = [f"data.dataset={user_module}:data_augmented", "method.name=noise", "--device", "cpu"]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert main(["train", "--recipe", recipe, "--out", full, *over]) == 0
    assert main(["train", "--recipe", recipe, "--out", split, "--stop-at-step", "5", *over]) == 0
    assert main(["train", "--resume", "--out", split, "--device", "cpu"]) == 0
    steps = _rows(os.path.join(full, "steps.csv"))
    assert len(steps) == 12 and _rows(os.path.join(split, "steps.csv")) == steps


@pytest.mark.slow
def test_consistency_run_leaves_no_hooks(tmp_path, user_module):
    cfg = resolve(_recipe(tmp_path, user_module), ["method.name=consistency", "schedule.epochs=1"])
    trainer = Trainer(cfg, str(tmp_path / "run"), device="cpu")
    result = trainer.fit()
    assert float(result.last["train_consistency"]) > 0
    assert all(not m._forward_hooks for m in trainer.base.modules())
    # stopped early (interrupted) leaves none either
    trainer = Trainer(cfg, str(tmp_path / "cut"), device="cpu", stop_at_step=2)
    assert trainer.fit().stopped
    assert all(not m._forward_hooks for m in trainer.base.modules())


def test_classifier_and_convnet_are_derived_or_declared(user_module):
    assert M.CLASSIFIER[f"{user_module}:build"] == "head"
    assert f"{user_module}:build" in M.CONVNETS
    assert M.CLASSIFIER[f"{user_module}:build_mlp"] == "b"  # the last layer with the class count
    assert f"{user_module}:build_mlp" not in M.CONVNETS
    assert M.CLASSIFIER[f"{user_module}:build_declared"] == "a"  # what the builder says
    assert f"{user_module}:build_declared" in M.CONVNETS
    assert M.CLASSIFIER["fashion_cnn"] == "fc" and "fashion_cnn" in M.CONVNETS
    assert "digits_mlp" not in M.CONVNETS and "nope" not in M.CONVNETS
    model = M.build_model(f"{user_module}:build", 7)
    assert model.head.out_features == 7


def test_weight_file_class_count_is_named_for_an_import_path_model(tmp_path, user_module, capsys):
    recipe = _recipe(tmp_path, user_module)
    path = str(tmp_path / "w.pth")
    torch.save(M.build_model(f"{user_module}:build", 5).state_dict(), path)
    capsys.readouterr()
    assert main(["train", "--recipe", recipe, "--out", str(tmp_path / "run"), f"teacher.weights={path}"]) == 2
    err = capsys.readouterr().err
    assert "has 5 classes (head.weight of shape (5, 12)) but the data has 3" in err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("key,value,fragment", [
    ("model.arch", "no_such_module_xyz:build", "model.arch 'no_such_module_xyz:build': cannot import"),
    ("model.arch", "{mod}:nope", "has no attribute 'nope'"),
    ("model.arch", "{mod}:LIST", "is a list, not a callable"),
    ("model.arch", "{mod}:not_a_model", "returned str, not a torch.nn.Module"),
    ("teacher.arch", "no_such_module_xyz:t", "teacher.arch 'no_such_module_xyz:t': cannot import"),
    ("data.dataset", "no_such_module_xyz:data", "data.dataset 'no_such_module_xyz:data': cannot import"),
    ("data.dataset", "{mod}:not_data", "returned list; it must return"),
    ("data.dataset", "{mod}:bad_samples", "sample 0 is a Tensor"),
    ("model.arch", "vgg", "model.arch must be one of"),
])
def test_import_errors_name_the_path_and_write_nothing(tmp_path, user_module, capsys, key, value, fragment):
    value = value.format(mod=user_module)
    recipe = _recipe(tmp_path, user_module)
    if key == "data.dataset":
        with pytest.raises(ConfigError, match="data.dataset"):
            build_data(resolve(recipe, [f"{key}={value}"]))
    out = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", "--recipe", recipe, "--out", out, f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnoise: error: ") and fragment in err, err
    assert value in err or key == "model.arch" and value == "vgg"
    assert not os.path.exists(out)


def test_noise_reaches_the_import_path_model(user_module):
    model = M.build_model(f"{user_module}:build", 3)
    fastnoise.convert(model, fastnoise.NoiseSpec(eta=0.1))
    assert [n for n, _ in fastnoise.noisy_layers(model)] == ["stem", "hidden", "head"]
