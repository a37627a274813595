"""Fashion-MNIST: the idx loader on tiny files written here (always), bad files, the real files
(where Debian's dataset-fashion-mnist is installed), and the three recipes end to end."""

import csv
import gzip
import os

import numpy as np
import pytest
import torch
from test_train_errors import _fails

from fastnoise.cli import main
from fastnoise.train import data as D
from fastnoise.train.recipes import ConfigError, resolve

pytestmark = pytest.mark.usefixtures("one_thread")

FASHION_RECIPES = ["fashion-mnist-noise", "fashion-mnist-kd", "fashion-mnist-consistency"]


def _idx_bytes(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


def _write(path, payload: bytes, compress=True):
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)


def _write_fashion(root, n_train=48, n_test=16, seed=0, compress=True):
    """Tiny idx files in the original layout; returns the arrays written."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        image_name, label_name = D.FASHION_FILES[split]
        suffix = ".gz" if compress else ""
        _write(os.path.join(root, image_name + suffix), _idx_bytes(images), compress)
        _write(os.path.join(root, label_name + suffix), _idx_bytes(labels), compress)
        arrays[split] = (images, labels)
    return arrays


def _cfg(root, augment=False):
    return resolve("fashion-mnist-noise", [f"data.augment={str(augment).lower()}"], data_root=root)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_loader_on_tiny_idx_files(tmp_path, compress):
    root = str(tmp_path / "fm")
    arrays = _write_fashion(root, compress=compress)
    bundle = D.build_data(_cfg(root))
    assert bundle.num_classes == 10
    assert bundle.classes[0] == "T-shirt/top" and bundle.classes[9] == "Ankle boot"
    for ds, split in ((bundle.train, "train"), (bundle.val, "test")):
        images, labels = arrays[split]
        assert len(ds) == len(labels)
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32
            assert y == int(labels[i])
            pixels = (x * D.FASHION_STD + D.FASHION_MEAN) * 255.0  # undo the normalisation
            torch.testing.assert_close(pixels[0], torch.from_numpy(images[i]).float(), atol=1e-3, rtol=0)
    assert not bundle.val.uses_rng and not bundle.train.uses_rng


def test_augmentation_is_a_seeded_flip_and_shift(tmp_path):
    root = str(tmp_path / "fm")
    arrays = _write_fashion(root)
    train = D.build_data(_cfg(root, augment=True)).train
    assert train.uses_rng
    seeded = D.SeededSamples(train)
    image = torch.from_numpy(arrays["train"][0][3]).float() / 255.0
    # every image the augmentation may give: optional flip, then a shift of -2..2 each way
    padded = {flip: torch.nn.functional.pad(image.flip(-1) if flip else image, (2, 2, 2, 2))
              for flip in (False, True)}
    candidates = [padded[f][dy:dy + 28, dx:dx + 28]
                  for f in (False, True) for dy in range(5) for dx in range(5)]
    seen = set()
    state = torch.get_rng_state()
    for seed in range(40):
        x, _ = seeded[(3, seed)]
        x2, _ = seeded[(3, seed)]
        assert torch.equal(x, x2)  # a function of the sample seed
        pixels = x[0] * D.FASHION_STD + D.FASHION_MEAN
        match = [i for i, c in enumerate(candidates) if torch.allclose(pixels, c, atol=1e-5)]
        assert match, f"seed {seed}: not a flip + shift of the image"
        seen.add(match[0])
    assert torch.equal(torch.get_rng_state(), state)  # the process's RNG untouched
    assert len(seen) > 10  # the seeds give different crops and flips


@pytest.mark.parametrize("kind", ["magic", "truncated", "longer", "counts", "label", "size", "not-gzip",
                                  "missing"])
def test_bad_files_are_config_errors_naming_the_file(tmp_path, capsys, kind):
    root = str(tmp_path / "fm")
    arrays = _write_fashion(root)
    images, labels = arrays["train"]
    img_path = os.path.join(root, "train-images-idx3-ubyte.gz")
    lab_path = os.path.join(root, "train-labels-idx1-ubyte.gz")
    if kind == "magic":  # a label file where the images should be
        _write(img_path, _idx_bytes(labels))
        want = [img_path, "magic number 0x00000803 expected, got 0x00000801"]
    elif kind == "truncated":
        _write(img_path, _idx_bytes(images)[:-5])
        want = [img_path, "(48, 28, 28)", "but the file holds"]
    elif kind == "longer":
        _write(lab_path, _idx_bytes(labels) + b"\0")
        want = [lab_path, "but the file holds"]
    elif kind == "counts":
        _write(lab_path, _idx_bytes(labels[:-1]))
        want = [img_path, "48 images", "47 labels"]
    elif kind == "label":
        bad = labels.copy()
        bad[5] = 10
        _write(lab_path, _idx_bytes(bad))
        want = [lab_path, "a label is 10"]
    elif kind == "size":
        _write(img_path, _idx_bytes(images[:, :27, :27]))
        want = [img_path, "27x27", "28x28"]
    elif kind == "not-gzip":
        with open(img_path, "wb") as f:
            f.write(b"this is not gzip data")
        want = [img_path, "cannot be read"]
    else:
        os.remove(lab_path)
        want = ["is not a Fashion-MNIST folder", "train-labels-idx1-ubyte.gz is missing"]
    with pytest.raises(ConfigError):
        D.build_data(_cfg(root))
    out = str(tmp_path / "run")
    _fails(capsys, ["train", "--recipe", "fashion-mnist-noise", "--data", root, "--out", out,
                    "--no-progress"], *want)
    assert not os.path.exists(out)


def test_no_root_and_no_debian_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "FASHION_DEBIAN_ROOT", str(tmp_path / "not-installed"))
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        D.build_data(resolve("fashion-mnist-noise"))
    _fails(capsys, ["train", "--recipe", "fashion-mnist-kd", "--out", str(tmp_path / "run")],
           "data.root is not set", "apt-get install dataset-fashion-mnist", "--data DIR")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(D.FASHION_DEBIAN_ROOT),
                    reason=f"Fashion-MNIST is not installed at {D.FASHION_DEBIAN_ROOT} "
                           "(apt-get install dataset-fashion-mnist)")
def test_the_real_files():
    bundle = D.build_data(resolve("fashion-mnist-noise", ["data.augment=false"]))  # data.root unset
    assert len(bundle.train) == 60000 and len(bundle.val) == 10000
    for ds in (bundle.train, bundle.val):  # both splits are balanced
        counts = torch.bincount(ds.targets, minlength=10)
        assert torch.equal(counts, torch.full((10,), len(ds) // 10))
    assert bundle.train[0][1] == 9  # the first training image is an ankle boot
    mean = bundle.train.images.float().mean() / 255.0
    assert abs(float(mean) - D.FASHION_MEAN) < 1e-3


def test_the_three_recipes_share_everything_but_the_method():
    cfgs = {r: resolve(r) for r in FASHION_RECIPES}
    methods = {r: c["method"]["name"] for r, c in cfgs.items()}
    assert methods == {"fashion-mnist-noise": "noise", "fashion-mnist-kd": "kd",
                       "fashion-mnist-consistency": "consistency"}
    for c in cfgs.values():
        c["name"] = c["method"]["name"] = None
    first = cfgs[FASHION_RECIPES[0]]
    assert all(c == first for c in cfgs.values())
    assert first["data"]["dataset"] == "fashion_mnist" and first["model"]["arch"] == "fashion_cnn"
    assert first["model"]["init"] == "teacher" and first["teacher"]["epochs"] > 0


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", FASHION_RECIPES)
def test_recipe_end_to_end_with_exact_resume(recipe, tmp_path):
    """Teacher trained first, augmentation on, stopped inside the second epoch and resumed:
    the same losses as an uninterrupted run."""
    root = str(tmp_path / "fm")
    _write_fashion(root, n_train=48, n_test=16)
    args = ["--recipe", recipe, "--data", root, "--no-progress", "--device", "cpu", "teacher.epochs=1",
            "schedule.epochs=2", "data.batch_size=16", "data.eval_batch_size=16", "data.augment=true",
            "eval.etas=[0.0, 0.08]", "eval.draws=2", "eval.epoch_draws=1", "log.every=1"]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    assert main(["train", *args, "--out", full]) == 0
    assert main(["train", *args, "--out", split, "--stop-at-step", "4"]) == 0
    assert main(["train", "--resume", "--out", split, "--no-progress", "--device", "cpu"]) == 0
    steps = _rows(os.path.join(full, "steps.csv"))
    assert len(steps) == 6 and _rows(os.path.join(split, "steps.csv")) == steps
    assert _rows(os.path.join(split, "robustness.csv")) == _rows(os.path.join(full, "robustness.csv"))
    a = torch.load(os.path.join(full, "model.pth"), weights_only=True)
    b = torch.load(os.path.join(split, "model.pth"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.isfile(os.path.join(full, "teacher", "model.pth"))
