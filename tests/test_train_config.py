"""Recipes, overrides, validation, the data order and the models."""

import pickle

import numpy as np
import pytest
import torch

from fastnoise.train import data as D
from fastnoise.train.models import ARCHS, build_model
from fastnoise.train.recipes import (
    DEFAULTS,
    ConfigError,
    apply_overrides,
    list_recipes,
    load_recipe,
    resolve,
    validate,
)
from fastnoise.train.trainer import lr_factor

SHIPPED = ["cifar-resnet32-consistency", "cifar-resnet32-kd", "digits", "fashion-mnist-consistency",
           "fashion-mnist-kd", "fashion-mnist-noise", "imagenet-resnet50-consistency", "imagenet-resnet50-kd",
           "licenses-llama"]


def test_shipped_recipes_load_and_validate():
    assert list_recipes() == SHIPPED
    for name in SHIPPED:
        cfg = validate(load_recipe(name))
        assert cfg["name"] == name
        assert set(cfg) == set(DEFAULTS)


def test_imagenet_recipes_follow_the_paper_settings():
    for name in ("imagenet-resnet50-kd", "imagenet-resnet50-consistency"):
        cfg = load_recipe(name)
        assert cfg["model"]["arch"] == "resnet50" and cfg["data"]["dataset"] == "imagefolder"
        assert cfg["noise"]["eta"] == 0.06 and cfg["noise"]["scale"] == "range"
    assert load_recipe("imagenet-resnet50-kd")["method"]["temperature"] == 6.0


def test_overrides_are_typed_by_yaml():
    cfg = apply_overrides(load_recipe("digits"), ["optim.lr=1e-4", "schedule.epochs=3",
                                                  "noise.exclude=[fc, conv1]", "model.init=null",
                                                  "optim.nesterov=true", "name=x"])
    assert cfg["optim"]["lr"] == pytest.approx(1e-4) and isinstance(cfg["optim"]["lr"], float)
    assert cfg["schedule"]["epochs"] == 3
    assert cfg["noise"]["exclude"] == ["fc", "conv1"]
    assert cfg["model"]["init"] is None and cfg["optim"]["nesterov"] is True and cfg["name"] == "x"


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("nosuch.key=1", "nosuch.key"),
    ("optim=3", "'optim' is a section"),
    ("optim.lr", "key=value"),
    ("seed.x=1", "seed.x"),
], ids=["unknown-leaf", "unknown-section", "section", "no-equals", "leaf-as-section"])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(load_recipe("digits"), [override])


@pytest.mark.parametrize("override,match", [
    ("optim.lr=-1", "optim.lr"), ("noise.scale=bogus", "noise.scale"),
    ("method.name=dropout", "method.name"), ("schedule.epochs=1.5", "schedule.epochs"),
    ("method.alpha=2", "method.alpha"), ("model.arch=vgg", "model.arch"),
    ("eval.etas=[0, -1]", "eval.etas"), ("data.batch_size=0", "data.batch_size"), ("amp=fp8", "amp"),
])
def test_validation_names_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(load_recipe("digits"), [override]))


def test_consistency_needs_layers_and_unknown_recipe_lists_shipped():
    with pytest.raises(ConfigError, match="method.layers is empty"):
        resolve("cifar-resnet32-kd", ["method.name=consistency"])
    with pytest.raises(ConfigError, match="shipped recipes: cifar-resnet32-consistency"):
        load_recipe("no-such-recipe")


def test_recipe_file_with_unknown_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: mine\noptim:\n  lr: 0.5\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match="optim.momentun"):
        load_recipe(str(p))
    p.write_text("name: mine\noptim:\n  lr: 0.5\n")
    assert load_recipe(str(p))["optim"]["lr"] == 0.5


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 4, 20, 0.0) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.0) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.0) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.0) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(5, 0, 10, 0.0) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- data order
def test_sampler_order_depends_on_seed_and_epoch_only():
    s = D.EpochBatchSampler(50, 8, seed=3)
    s.set_epoch(0)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    assert len(a) == s.steps_per_epoch == 6
    assert a != b
    s2 = D.EpochBatchSampler(50, 8, seed=3)
    s2.set_epoch(0)
    assert list(s2) == a
    idx = [i for batch in a for i, _ in batch]
    assert len(set(idx)) == 48  # no repeats; the last partial batch is dropped


def test_sampler_resumes_at_a_step_and_splits_across_ranks():
    full = D.EpochBatchSampler(40, 8, seed=0)
    full.set_epoch(2)
    batches = list(full)
    full.set_epoch(2, start_step=3)
    assert list(full) == batches[3:] and len(full) == 2
    ranks = [D.EpochBatchSampler(40, 8, seed=0, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    for step, (b0, b1) in enumerate(zip(*[list(r) for r in ranks], strict=True)):
        assert b0 + b1 == batches[step]
    with pytest.raises(ConfigError, match="divisible"):
        D.EpochBatchSampler(40, 7, seed=0, world_size=2)
    with pytest.raises(ConfigError, match="larger than the training set"):
        D.EpochBatchSampler(4, 8, seed=0)


class _RandomDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(3), i


def test_seeded_samples_do_not_depend_on_order_or_global_rng():
    ds = D.SeededSamples(_RandomDataset())
    a = ds[(4, 123)][0]
    torch.rand(100)
    state = torch.get_rng_state()
    _ = ds[(5, 7)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    assert torch.equal(ds[(4, 123)][0], a)
    assert not torch.equal(ds[(4, 124)][0], a)


def _write_cifar(root, n_per_batch=6, classes=10):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, classes, n_per_batch)]}
        with open(root / name, "wb") as f:
            pickle.dump(d, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(classes)]}, f)


def test_cifar_pickle_layout(tmp_path):
    _write_cifar(tmp_path / "c")
    cfg = resolve("cifar-resnet32-kd", data_root=str(tmp_path / "c"))
    bundle = D.build_data(cfg)
    assert bundle.num_classes == 10 and len(bundle.train) == 30 and len(bundle.val) == 6
    x, y = bundle.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    with open(tmp_path / "c" / "test_batch", "rb") as f:
        raw = pickle.load(f)
    img = torch.tensor(raw[b"data"][0], dtype=torch.float32).view(3, 32, 32) / 255
    want = (img - torch.tensor(D.CIFAR_MEAN).view(3, 1, 1)) / torch.tensor(D.CIFAR_STD).view(3, 1, 1)
    torch.testing.assert_close(x, want)
    # augmentation: a padded crop + flip, a pure function of the sample seed
    ds = D.SeededSamples(bundle.train)
    assert torch.equal(ds[(0, 5)][0], ds[(0, 5)][0])


def test_cifar_missing_file(tmp_path):
    _write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match="missing data_batch_3"):
        D.build_data(resolve("cifar-resnet32-kd", data_root=str(tmp_path / "c")))


def test_digits_split_is_fixed():
    a, b = D.DigitsDataset(True), D.DigitsDataset(False)
    assert len(a) == 1347 and len(b) == 450
    assert a.images.min() >= -1 and a.images.max() <= 1 and a.images.shape[1:] == (1, 8, 8)
    assert torch.equal(D.DigitsDataset(False).targets, b.targets)


# ----------------------------------------------------------------------------- models
@pytest.mark.slow
def test_resnet32_structure():
    m = build_model("resnet32", 10)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 31  # 1 + 3 stages * 5 blocks * 2; + fc = 32 weighted layers
    assert [len(getattr(m, f"layer{i}")) for i in (1, 2, 3)] == [5, 5, 5]
    assert [getattr(m, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [16, 32, 64]
    assert 0.45e6 < sum(p.numel() for p in m.parameters()) < 0.48e6
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_build_model_errors():
    assert set(ARCHS) >= {"resnet32", "resnet50", "digits_cnn", "digits_mlp"}
    with pytest.raises(ValueError, match="vgg"):
        build_model("vgg", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("digits_mlp", 1)
