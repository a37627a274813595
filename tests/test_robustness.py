"""fastnoise.evaluate_robustness and its result object."""

import csv

import pytest
import torch
from torch import nn

import fastnoise
from fastnoise.robustness import RobustnessResult, plot_results, results_table, results_to_csv


def _model_and_loader(n=61, d=13, classes=5):
    torch.manual_seed(1)
    w = torch.randn(classes, d)
    x = torch.randn(n, d)
    y = (x @ w.t()).argmax(-1)
    model = nn.Sequential(nn.Linear(d, 17), nn.ReLU(), nn.Linear(17, classes))
    with torch.no_grad():  # a model that is right on most samples: a clean teacher of sorts
        model[0].weight.copy_(torch.cat([w, -w, torch.zeros(17 - 2 * classes, d)]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.cat([torch.eye(classes), -torch.eye(classes),
                                         torch.zeros(classes, 17 - 2 * classes)], 1))
        model[2].bias.zero_()
    fastnoise.convert(model, fastnoise.NoiseSpec(eta=0.05))
    loader = [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
    return model, loader, x, y


def _top1_by_hand(model, x, y):
    with torch.no_grad():
        return 100.0 * (model(x).argmax(-1) == y).float().mean().item()


def test_clean_and_noisy_passes_match_manual_draws():
    model, loader, x, y = _model_and_loader()
    model.train()
    r = fastnoise.evaluate_robustness(model, loader, [0.0, 0.1, 0.3], draws=3, progress=False)
    assert model.training  # the mode is given back
    assert r.etas == [0.0, 0.1, 0.3] and [len(a) for a in r.accuracies] == [1, 3, 3]
    assert r.samples == 61
    model.eval()
    assert r.accuracies[0][0] == pytest.approx(_top1_by_hand(model, x, y))
    assert r.accuracies[0][0] == pytest.approx(100.0)
    for i, eta in ((1, 0.1), (2, 0.3)):
        for k in range(3):
            with fastnoise.noise(eta=eta, draw=k):
                assert r.accuracies[i][k] == pytest.approx(_top1_by_hand(model, x, y))
    assert r.std[0] == 0.0
    assert r.mean[2] < r.mean[0]  # eta 0.3 hurts


def test_draw_is_one_chip_for_the_whole_pass_and_counters_do_not_move():
    model, loader, x, y = _model_and_loader()
    before = fastnoise.noise_state_dict(model)
    r1 = fastnoise.evaluate_robustness(model, loader, [0.2], draws=4, progress=False)
    r2 = fastnoise.evaluate_robustness(model, loader, [0.2], draws=4, progress=False)
    assert r1.accuracies == r2.accuracies
    assert fastnoise.noise_state_dict(model) == before
    assert len(set(r1.accuracies[0])) > 1  # different chips differ
    # one chip for the whole pass: batch-wise accuracy equals a single full-batch pass
    big = fastnoise.evaluate_robustness(model, [(x, y)], [0.2], draws=4, progress=False)
    assert big.accuracies == r1.accuracies


def test_spec_overrides_scale():
    model, loader, _, _ = _model_and_loader()
    a = fastnoise.evaluate_robustness(model, loader, [0.3], 3, progress=False)
    b = fastnoise.evaluate_robustness(model, loader, [0.3], 3, spec=fastnoise.NoiseSpec(scale="proportional"),
                                      progress=False)
    assert a.scale == "range" and b.scale == "proportional"
    assert a.accuracies != b.accuracies


def test_errors():
    model, loader, _, _ = _model_and_loader()
    with pytest.raises(ValueError, match="draws"):
        fastnoise.evaluate_robustness(model, loader, [0.1], 0)
    with pytest.raises(ValueError, match="-0.1"):
        fastnoise.evaluate_robustness(model, loader, [0.0, -0.1], 2)
    with pytest.raises(ValueError, match="etas is empty"):
        fastnoise.evaluate_robustness(model, loader, [], 2)
    with pytest.raises(TypeError, match="NoiseSpec"):
        fastnoise.evaluate_robustness(model, loader, [0.1], 2, spec="range")
    plain = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="fastnoise.convert"):
        fastnoise.evaluate_robustness(plain, [(torch.randn(2, 3), torch.tensor([0, 1]))], [0.1], 2)
    r = fastnoise.evaluate_robustness(plain, [(torch.randn(2, 3), torch.tensor([0, 1]))], [0.0], 2,
                                      progress=False)
    assert len(r.accuracies[0]) == 1


def test_table_csv_and_plots(tmp_path):
    r = RobustnessResult([0.0, 0.1], [[90.0], [80.0, 70.0, 75.0]], name="kd", scale="range", samples=10)
    assert r.mean == [90.0, 75.0] and r.std[1] == pytest.approx(5.0) and r.min[1] == 70.0 and r.max[1] == 80.0
    text = r.table()
    assert "| 0.1 | 3 | 75.00 | 5.00 | 70.00 | 80.00 |" in text and str(r) == text
    r.to_csv(tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert rows[1]["mean"] == "75.0" and rows[1]["acc_2"] == "75.0" and rows[0]["acc_1"] == ""
    r.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = RobustnessResult([0.0, 0.1], [[91.0], [60.0, 62.0]], name="noise")
    both = {"kd": r, "noise": other}
    assert "| 0.1 | 75.0 ± 5.0 | 61.0 ± 1.4 |" in results_table(both)
    plot_results(both, tmp_path / "both.png")
    assert (tmp_path / "both.png").stat().st_size > 1000
    results_to_csv(both, tmp_path / "both.csv")
    assert len(list(csv.DictReader(open(tmp_path / "both.csv")))) == 4
    with pytest.raises(ValueError, match="etas"):
        results_table({"a": r, "b": RobustnessResult([0.0], [[1.0]])})


def test_pregenerated_passes_give_the_same_table():
    """One noisy copy of the weights per pass (fastnoise.pregenerated) changes nothing."""
    model, loader, _, _ = _model_and_loader()
    a = fastnoise.evaluate_robustness(model, loader, [0.0, 0.2], 3, progress=False, pregenerate=False)
    b = fastnoise.evaluate_robustness(model, loader, [0.0, 0.2], 3, progress=False, pregenerate=True)
    assert a.accuracies == b.accuracies
    default = fastnoise.evaluate_robustness(model, loader, [0.0, 0.2], 3, progress=False)
    assert default.accuracies == a.accuracies
    assert len(set(a.accuracies[1])) > 1  # the chips differ, so equal tables are not a coincidence
    # the chips of a seed (layers named by their place) too
    c = fastnoise.evaluate_robustness(model, loader, [0.2], 3, progress=False, pregenerate=False, seed=4,
                                      name="mine")
    assert c.name == "mine"  # not a layer's name
    d = fastnoise.evaluate_robustness(model, loader, [0.2], 3, progress=False, pregenerate=True, seed=4)
    assert c.accuracies == d.accuracies and c.accuracies != a.accuracies[1:]


@pytest.mark.gpu
def test_cuda_bf16_channels_last_and_pregenerated():
    """On a GPU: a CIFAR ResNet-32 under bf16 autocast and channels_last, several batches per
    pass; keeping each chip's weights for the pass agrees with per-batch noise to rounding."""
    from fastnoise.train.models import build_model

    model = fastnoise.convert(build_model("resnet32", 10), fastnoise.NoiseSpec(eta=0.05)).cuda()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(301, 3, 32, 32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        # labels the clean model gets right (up to near-ties that batching may flip)
        y = model.eval()(x.contiguous(memory_format=torch.channels_last)).argmax(-1)
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 301, 64)]
    kw = dict(progress=False, autocast_dtype=torch.bfloat16, channels_last=True)
    a = fastnoise.evaluate_robustness(model, loader, [0.0, 0.05, 0.1], 4, pregenerate=False, **kw)
    b = fastnoise.evaluate_robustness(model, loader, [0.0, 0.05, 0.1], 4, pregenerate=True, **kw)
    assert a.mean[0] > 90.0
    for ra, rb in zip(a.accuracies, b.accuracies, strict=True):
        for va, vb in zip(ra, rb, strict=True):
            assert abs(va - vb) <= 100.0 * 3 / 301
    assert a.mean[2] < a.mean[0]
