"""Data parallel: 2 gloo processes (torchrun) train the same weights as 1 process with the same
global batch, and every rank draws the same noise."""

import json
import os
import sys

import pytest
import torch
from _torchrun import run, two_ranks

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
OVERRIDES = ["model.arch=digits_mlp", "model.init=null", "method.name=noise", "noise.eta=0.1",
             "data.batch_size=64", "schedule.epochs=1", "optim.name=sgd", "optim.lr=0.05",
             "eval.etas=[0.0, 0.05]", "eval.draws=2", "eval.epoch_draws=1", "log.every=5"]


def test_two_gloo_ranks_match_one_process(tmp_path):
    worker = os.path.join(HERE, "_ddp_worker.py")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run([sys.executable, worker, one, *OVERRIDES], tmp_path)
    two_ranks(worker, two, *OVERRIDES, cwd=tmp_path)
    solo = json.load(open(os.path.join(one, "rank0.json")))
    r0 = json.load(open(os.path.join(two, "rank0.json")))
    r1 = json.load(open(os.path.join(two, "rank1.json")))
    assert solo["world_size"] == 1 and r0["world_size"] == r1["world_size"] == 2

    # the same noise on every rank, and the same as in one process
    assert r0["noise_seed"] == r1["noise_seed"] == solo["noise_seed"]
    assert r0["noise"] == r1["noise"] == solo["noise"]
    assert all(s["calls"] == 1347 // 64 for s in solo["noise"].values())  # evaluation draws do not count
    assert r0["last_noise"] == r1["last_noise"]

    # the same weights (to fp32 rounding: per-rank means averaged vs one mean)
    for k, v in solo["weights"].items():
        a, b, c = torch.tensor(v), torch.tensor(r0["weights"][k]), torch.tensor(r1["weights"][k])
        assert torch.equal(b, c), f"ranks disagree on {k}"
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)
    # metrics: rank 0 only, validated over both shards
    assert os.path.isfile(os.path.join(two, "metrics.csv")) and os.path.isfile(os.path.join(two, "model.pth"))
    assert r0["metrics"][0]["val_top1"] == pytest.approx(solo["metrics"][0]["val_top1"], abs=0.5)
    assert r0["metrics"][0]["train_loss"] == pytest.approx(solo["metrics"][0]["train_loss"], rel=1e-4)
