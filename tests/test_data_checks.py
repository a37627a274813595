"""Targets and data are checked, with errors that name what is wrong (issue 21, items 3, 6, 7, 8):

- ``evaluate_robustness`` (and so ``fit``'s ``val_top1``): targets of shape ``[n, 1]`` (which
  broadcast against ``[n]`` predictions into 910 % top-1), float or bool targets, labels outside
  ``[0, classes)`` and an output of shape ``[n, 3, 1]`` are refused, naming the batch;
- ``fit``: every label of a dataset that keeps them apart (TensorDataset, ``.targets``) is
  checked before the run folder is written (naming the first bad index), and the labels of any
  other dataset as each training batch is read; 3-item samples and a model with no trainable
  parameters are refused before anything is written;
- NaN / inf training inputs are named (sample index, step), not reported as a too-large lr.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fastnoise
from fastnoise import NoiseSpec
from fastnoise.train import ConfigError, fit

pytestmark = pytest.mark.usefixtures("one_thread")

N, D, C = 24, 6, 3


def _model():
    torch.manual_seed(0)
    return fastnoise.convert(nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C)), NoiseSpec(0.05))


def _xy(n=N):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


# ----------------------------------------------------------------------------- evaluate_robustness
class _Reshaped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[..., None]  # [n, 3, 1]


@pytest.mark.parametrize("case", ["column", "float", "bool", "one-based", "negative", "output-3d"])
def test_evaluate_robustness_refuses_targets_and_outputs_it_cannot_score(case):
    model = _model()
    x, y = _xy()
    want = {"column": (ValueError, r"shape \[8, 1\].*squeeze"), "float": (TypeError, "float32"),
            "bool": (TypeError, "bool"), "one-based": (ValueError, r"is 3, outside \[0, 3\).*1-based"),
            "negative": (ValueError, r"position 5 of batch 1.* is -1"),
            "output-3d": (ValueError, r"output .* has shape \[8, 3, 1\]")}[case]
    if case == "column":
        y = y[:, None]
    elif case == "float":
        y = y.float()
    elif case == "bool":
        y = y > 0
    elif case == "one-based":
        y = y + 1
        y[0] = C  # at least one label past the last class
    elif case == "negative":
        y[8 + 5] = -1
    elif case == "output-3d":
        model = _Reshaped(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(want[0], match=want[1]):
        fastnoise.evaluate_robustness(model, loader, [0.0, 0.1], 2, progress=False)


def test_evaluate_robustness_scores_good_targets_as_before():
    model = _model().eval()
    x, y = _xy()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    got = fastnoise.evaluate_robustness(model, loader, [0.0], 1, progress=False)
    with torch.no_grad():
        want = 100.0 * float((model(x).argmax(-1) == y).float().mean())
    assert got.mean[0] == pytest.approx(want)


# ----------------------------------------------------------------------------- fit: before writing
def _fit_fails(tmp_path, train, val=None, model=None, match=""):
    out = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=match):
        fit(model or _model(), train, val, out_dir=out, epochs=1, batch_size=8, messages=lambda m: None,
            device="cpu", eval={"etas": [0.0], "epoch_draws": 0})
    assert not os.path.exists(out)  # nothing written: the same call, fixed, is not "already exists"


@pytest.mark.parametrize("case", ["late-out-of-range", "float", "bool", "column", "val-one-based"])
def test_fit_checks_every_label_before_the_run_folder_is_written(tmp_path, case):
    x, y = _xy()
    vx, vy = _xy(16)
    match = {"late-out-of-range": r"train_data\[17\]'s label is 7", "float": "float32",
             "bool": "labels must be integers|bool", "column": r"shape \[24, 1\]",
             "val-one-based": r"val_data\[5\]'s label is 3.*1-based"}[case]
    if case == "late-out-of-range":
        y[17] = 7  # sample 0 is fine: the old check read only it
    elif case == "float":
        y = y.float()
    elif case == "bool":
        y = y > 0
    elif case == "column":
        y = y[:, None]
    elif case == "val-one-based":
        vy[5] = C
    _fit_fails(tmp_path, TensorDataset(x, y), TensorDataset(vx, vy), match=match)


def test_fit_refuses_three_item_samples_before_writing(tmp_path):
    x, y = _xy()
    _fit_fails(tmp_path, TensorDataset(x, y, y), TensorDataset(x[:8], y[:8]),
               match=r"train_data\[0\] is a 3-item tuple")


@pytest.mark.parametrize("case", ["all-frozen", "none"])
def test_fit_refuses_a_model_with_nothing_to_train(tmp_path, case):
    x, y = _xy()
    if case == "all-frozen":
        model = _model().requires_grad_(False)
        match = "nothing to train: all 4 of its parameter tensors are frozen"
    else:
        class NoParams(nn.Module):
            def forward(self, x):
                return x[:, :C]

        model, match = NoParams(), "nothing to train: it has no parameters"
    _fit_fails(tmp_path, TensorDataset(x, y), model=model, match=match)


class _Plain(Dataset):
    """No .targets: its labels are known only by reading its samples."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_fit_names_a_bad_label_of_a_dataset_without_targets_as_training_reads_it(tmp_path):
    x, y = _xy()
    y[20] = C + 4
    with pytest.raises(ConfigError, match=r"target at position \d+ of the training batch of step \d+ "
                                          r"\(epoch 1\) is 7, outside \[0, 3\)"):
        fit(_model(), _Plain(x, y), out_dir=str(tmp_path / "run"), epochs=1, batch_size=8,
            messages=lambda m: None, device="cpu", eval={"etas": [0.0], "epoch_draws": 0})


def test_nonfinite_training_inputs_are_named_not_blamed_on_the_lr(tmp_path):
    x, y = _xy()
    x[13, 2] = float("nan")
    match = r"sample 13 \(position \d of the batch of step \d, epoch 1\) holds nan"
    with pytest.raises(ConfigError, match=match) as e:
        fit(_model(), TensorDataset(x, y), out_dir=str(tmp_path / "run"), epochs=1, batch_size=8,
            messages=lambda m: None, device="cpu", eval={"etas": [0.0], "epoch_draws": 0}, log={"every": 2})
    assert "optim.lr" not in str(e.value)


def test_fit_names_a_bad_validation_label_of_a_dataset_without_targets(tmp_path):
    """val_top1 was 660% with [n, 1] targets; labels outside [0, classes) scored 0%."""
    x, y = _xy()
    vx, vy = _xy(16)
    vy[9] = C
    match = r"the validation data: the target at position 9 of batch 0 .* is 3, outside \[0, 3\)"
    with pytest.raises(ConfigError, match=match):
        fit(_model(), TensorDataset(x, y), _Plain(vx, vy), out_dir=str(tmp_path / "run"), epochs=1,
            batch_size=8, messages=lambda m: None, device="cpu", eval={"etas": [0.0], "epoch_draws": 0})
