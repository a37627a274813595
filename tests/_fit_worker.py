"""A user's own model and data for tests/test_train_fit.py, and a script that trains them with
``fastnoise.train.fit`` (alone, or under torchrun) and dumps what it trained to OUT/rank{R}.json.

    python _fit_worker.py OUT METHOD [resume] [1epoch]
"""

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

import fastnoise
from fastnoise.train import fit

CLASSES = 4
# 4 steps an epoch at batch 64; each step's loss is logged
SETTINGS = {"epochs": 2, "batch_size": 64, "spec": fastnoise.NoiseSpec(eta=0.1),
            "optim": {"lr": 0.05}, "schedule": {"warmup_epochs": 0.5},
            "eval": {"etas": [0.0, 0.1], "draws": 2, "epoch_draws": 1},
            "log": {"every": 1, "progress": False}}


class UserNet(nn.Module):
    """Not one of the package's models: a named submodule (``body``) for consistency."""

    def __init__(self, width: int = 32, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(),
                                  *([nn.Dropout(dropout)] if dropout else []))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.head(self.body(x))


def make_model(seed: int = 1, dropout: float = 0.0) -> UserNet:
    torch.manual_seed(seed)
    return UserNet(dropout=dropout)


def make_data():
    """256 training and 64 validation samples of 1x8x8 inputs with a learnable label."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(320, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].sum((1, 2)) > 0).long() * 2 + (x[:, 0, 4:].sum((1, 2)) > 0).long()
    return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])


def make_teacher() -> UserNet:
    """A fixed teacher (its quality does not matter to the tests), frozen in part and in train
    mode, so that a change to its flags or modes shows."""
    t = make_model(7)
    t.head.weight.requires_grad_(False)
    t.train()
    return t


def run(out, method, resume=False, stop_at_step=None, dropout=0.0, **kw):
    train, val = make_data()
    settings = dict(SETTINGS)
    settings.update(kw)
    teacher = make_teacher() if method == "kd" else None
    if method == "consistency":
        method = {"name": "consistency", "layers": ["body"]}
    return fit(make_model(dropout=dropout), train, val, method=method, teacher=teacher, out_dir=out,
               resume=resume, stop_at_step=stop_at_step, messages=lambda m: None, **settings)


def main(out: str, method: str, flags: list) -> None:
    torch.set_num_threads(1)
    resume = "resume" in flags
    kw = {"epochs": 1} if "1epoch" in flags else {}
    result = run(out, method, resume=resume, overwrite=not resume, **kw)
    rank = int(os.environ.get("RANK", "0"))
    info = {"world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "noise_seed": fastnoise.initial_seed(),
            "noise": fastnoise.noise_state_dict(result.model),
            "weights": {k: v.tolist() for k, v in result.model.state_dict().items()},
            "metrics": result.history}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
