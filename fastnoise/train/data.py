"""Datasets of the recipes, and a data order that resumes exactly.

Datasets (``data.dataset``):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no
  download), split once by a fixed permutation into 1347 training and 450 test images.
- ``fashion_mnist``: Fashion-MNIST (Xiao et al. 2017; 60000 training and 10000 test 28x28
  grey images of 10 kinds of clothing) from its original idx files
  (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-...``) in
  ``data.root``; unset, Debian's ``/usr/share/datasets/fashion-mnist`` (``apt-get install
  dataset-fashion-mnist``). Augmented (``data.augment``) with a random horizontal flip and a
  random shift of up to 2 pixels (zero padded).
- ``cifar10``: CIFAR-10's python-pickle folder (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``, ``batches.meta``), augmented with a 4-pixel padded random crop and a flip.
- ``imagefolder``: torchvision ``ImageFolder`` ``train/`` and ``val/`` folders (ImageNet
  layout) with the usual ImageNet augmentation (random resized crop + flip; resize + centre
  crop for validation). An image that cannot be read is an error naming the file, or, with
  ``data.skip_unreadable=true``, replaced by the next readable sample and reported on stderr.
- ``licenses`` (``task: causal_lm``): token data for a causal language model, the license texts
  of Debian's ``base-files`` package (``/usr/share/common-licenses``, ~250 KB of English; or the
  files of ``data.root``) read as bytes (token ids 0-255, a vocabulary of 256) and cut into
  sequences of :data:`LICENSE_SEQUENCE` bytes, every 10th into the validation set
  (:func:`license_sequences`).
- ``module.path:function`` (any name with a colon): the user's own data, see
  :func:`build_data` for the protocol.

Every dataset must have at least two classes (for token data: a vocabulary of two or more).

Data order: epoch ``e`` visits the training set in ``randperm(n)`` drawn from a generator seeded
with ``(seed, e)``; step ``s`` takes the global batch ``perm[s*B:(s+1)*B]`` and rank ``r`` of
``W`` its ``r``-th slice of ``B / W`` samples. Each sample's augmentation draws from torch's
RNG seeded with ``(seed, e, index)``, so neither the number of workers, nor the number of ranks,
nor an interruption changes what a step sees: a resumed run starts at the step it stopped at.
"""

from __future__ import annotations

import copy
import glob
import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..rng import mix64
from .errors import ConfigError
from .importpath import import_object, is_import_path

__all__ = ["DataBundle", "build_data", "EpochBatchSampler", "SeededSamples", "train_loader",
           "eval_loader", "DigitsDataset", "CifarDataset", "FashionMNISTDataset", "CIFAR_FILES",
           "FASHION_FILES", "FASHION_DEBIAN_ROOT", "DATASETS", "read_idx", "sample_seed", "load_image",
           "SkipUnreadable", "UnreadableFileError", "LICENSES_ROOT", "LICENSE_SEQUENCE", "BYTE_VOCAB",
           "LM_DATASETS", "license_sequences"]

CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # of the 60000 training images, pixels in [0, 1]
DIGITS_SPLIT_SEED = 20240601  # fixed: the split never depends on the run's seed
DIGITS_TRAIN = 1347


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    num_classes: int
    classes: list = field(default_factory=list)


# ----------------------------------------------------------------------------- datasets
class DigitsDataset(Dataset):
    """The scikit-learn digits as ``[1, 8, 8]`` float tensors in [-1, 1]."""

    uses_rng = False  # no augmentation

    def __init__(self, train: bool):
        from sklearn.datasets import load_digits

        digits = load_digits()
        perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(digits.target))
        idx = perm[:DIGITS_TRAIN] if train else perm[DIGITS_TRAIN:]
        images = torch.as_tensor(digits.images[idx], dtype=torch.float32)
        self.images = (images / 8.0 - 1.0).unsqueeze(1)  # pixel values are 0..16
        self.targets = torch.as_tensor(digits.target[idx], dtype=torch.int64)
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


def _read_pickle(path: str) -> dict:
    """A CIFAR python pickle; any file that is not one is a :class:`ConfigError` naming it."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # unpickling a damaged file can raise almost anything
        raise ConfigError(f"{path} is not a CIFAR-10 python batch: it is damaged or truncated "
                          f"({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path} is not a CIFAR-10 python batch (it holds a {type(d).__name__}, "
                          "not a dict)")
    return d


def _get(d: dict, key: str):
    """A CIFAR pickle's entry, whether its keys are bytes (the original files) or str."""
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise KeyError(key)


class CifarDataset(Dataset):
    """CIFAR-10 from its python-pickle folder; returns normalised ``[3, 32, 32]`` tensors."""

    def __init__(self, root: str, train: bool, augment: bool):
        files = CIFAR_FILES[:5] if train else ("test_batch",)
        data, labels = [], []
        for name in files:
            path = os.path.join(root, name)
            try:
                d = _read_pickle(path)
                data.append(np.asarray(_get(d, "data"), dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(v) for v in _get(d, "labels"))
            except (KeyError, ValueError, TypeError) as e:
                raise ConfigError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
        self.images = torch.from_numpy(np.concatenate(data))  # uint8 [N, 3, 32, 32]
        self.targets = torch.tensor(labels, dtype=torch.int64)
        if len(self.targets) != len(self.images):
            raise ConfigError(f"{root}: {len(self.images)} images but {len(self.targets)} labels")
        if len(self.targets) and int(self.targets.min()) < 0:
            raise ConfigError(f"{root}: a label is {int(self.targets.min())} (labels are class indices >= 0)")
        self.augment = self.uses_rng = augment
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i].float() / 255.0
        if self.augment:  # 4-pixel zero padding, random 32x32 crop, random flip (torch's RNG)
            x = torch.nn.functional.pad(x, (4, 4, 4, 4))
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            x = x[:, dy:dy + 32, dx:dx + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.targets[i])


def read_idx(path: str, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes (LeCun's MNIST format; gzip-compressed if ``.gz``).

    Header: two zero bytes, the type byte ``0x08`` (unsigned byte), the number of dimensions,
    then each dimension as a big-endian uint32; the data follow, row-major. Anything else (a
    wrong magic number, a file shorter or longer than its header says, a broken gzip stream)
    is a :class:`ConfigError` naming the file.
    """
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    head = 4 + 4 * ndim
    magic = 0x0800 | ndim
    if len(raw) < head or int.from_bytes(raw[:4], "big") != magic:
        got = f"0x{raw[:4].hex()}" if len(raw) >= 4 else f"{len(raw)} bytes"
        raise ConfigError(f"{path}: not an idx file of unsigned bytes with {ndim} dimension(s) "
                          f"(magic number 0x{magic:08x} expected, got {got})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = head + math.prod(dims)
    if len(raw) != size:
        raise ConfigError(f"{path}: its header says {dims} ({size} bytes) but the file holds "
                          f"{len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


def _fashion_file(root: str, name: str) -> str:
    for candidate in (f"{name}.gz", name):
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"{root!r} is not a Fashion-MNIST folder: {name}.gz is missing (the folder needs "
                      "the four original idx files: train-images-idx3-ubyte.gz, "
                      "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)")


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST from its idx files: normalised ``[1, 28, 28]`` float tensors and labels 0..9.

    ``augment``: a random horizontal flip and a random shift of up to 2 pixels each way (zero
    padded), drawn from torch's RNG (seeded per sample by :class:`SeededSamples`).
    """

    def __init__(self, root: str, train: bool, augment: bool = False):
        image_name, label_name = FASHION_FILES["train" if train else "test"]
        image_path, label_path = _fashion_file(root, image_name), _fashion_file(root, label_name)
        images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
        if images.shape[1:] != (28, 28):
            raise ConfigError(f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, "
                              "Fashion-MNIST's are 28x28")
        if len(images) != len(labels):
            raise ConfigError(f"{image_path} holds {len(images)} images but {label_path} holds "
                              f"{len(labels)} labels")
        if len(labels) and int(labels.max()) >= len(FASHION_CLASSES):
            raise ConfigError(f"{label_path}: a label is {int(labels.max())}, Fashion-MNIST has "
                              f"{len(FASHION_CLASSES)} classes (0..9)")
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # uint8 [N, 1, 28, 28]
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.classes = list(FASHION_CLASSES)
        self.augment = self.uses_rng = bool(augment)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255.0)
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            x = torch.nn.functional.pad(x, (2, 2, 2, 2))[:, dy:dy + 28, dx:dx + 28]
        return x.sub_(FASHION_MEAN).div_(FASHION_STD), int(self.targets[i])


def _fashion_mnist(cfg) -> DataBundle:
    root = cfg["data"]["root"]
    if root is None:
        if not os.path.isdir(FASHION_DEBIAN_ROOT):
            raise ConfigError(
                "data.root is not set and Fashion-MNIST is not at Debian's location "
                f"{FASHION_DEBIAN_ROOT}: install it (apt-get install dataset-fashion-mnist) or pass "
                "--data DIR, a folder of the original idx files (train-images-idx3-ubyte.gz, "
                "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)")
        root = FASHION_DEBIAN_ROOT
    else:
        root = _require_root(cfg)
    train = FashionMNISTDataset(root, True, bool(cfg["data"]["augment"]))
    val = FashionMNISTDataset(root, False, False)
    return DataBundle(train, val, len(FASHION_CLASSES), list(FASHION_CLASSES))


def _digits(cfg) -> DataBundle:
    train, val = DigitsDataset(True), DigitsDataset(False)
    return DataBundle(train, val, 10, train.classes)


LICENSES_ROOT = "/usr/share/common-licenses"  # Debian's base-files package
LICENSE_SEQUENCE = 64  # bytes per sequence (the tiny_llama model's positions)
BYTE_VOCAB = 256


def license_sequences(length: int = LICENSE_SEQUENCE, root: str = LICENSES_ROOT) -> tuple[list, list]:
    """Byte sequences (LongTensors ``[length]``, ids 0-255) cut from the files of ``root`` (sorted by
    name, links and folders skipped) read one after another; every 10th sequence goes to the
    validation set. Raises :class:`ConfigError` when ``root`` holds too little text."""
    if not os.path.isdir(root):
        raise ConfigError(f"the license texts are not at {root!r}: Debian's base-files package ships them in "
                          f"{LICENSES_ROOT}; data.root (--data) names another folder of text files")
    files = sorted(p for p in glob.glob(os.path.join(root, "*"))
                   if os.path.isfile(p) and not os.path.islink(p))
    data = b"".join(open(p, "rb").read() for p in files)
    ids = (torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data
           else torch.zeros(0, dtype=torch.long))
    seqs = list(ids[: len(ids) // length * length].view(-1, length))
    if len(seqs) < 2:
        raise ConfigError(f"{root!r} holds {len(data)} bytes of text in {len(files)} file(s): at least "
                          f"{2 * length} are needed (two sequences of {length}: to train and to validate)")
    return [s for i, s in enumerate(seqs) if i % 10], [s for i, s in enumerate(seqs) if i % 10 == 0]


def _licenses(cfg) -> DataBundle:
    train, val = license_sequences(LICENSE_SEQUENCE, cfg["data"]["root"] or LICENSES_ROOT)
    return DataBundle(train, val, BYTE_VOCAB, [])


def _require_root(cfg) -> str:
    root = cfg["data"]["root"]
    if root is None:
        raise ConfigError(f"data.root is not set: dataset {cfg['data']['dataset']!r} reads a local "
                          "folder (pass --data DIR)")
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        if os.path.exists(root):
            raise ConfigError(f"data folder {root!r} is a file, not a folder: pass --data DIR, the folder "
                              f"that holds the {cfg['data']['dataset']} files")
        raise ConfigError(f"data folder {root!r} does not exist")
    return root


def _cifar(cfg) -> DataBundle:
    root = _require_root(cfg)
    missing = [f for f in CIFAR_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise ConfigError(f"{root!r} is not a CIFAR-10 python folder: missing {', '.join(missing)}")
    meta = _read_pickle(os.path.join(root, "batches.meta"))
    try:
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in _get(meta, "label_names")]
    except (KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{os.path.join(root, 'batches.meta')} has no label_names") from e
    train = CifarDataset(root, True, bool(cfg["data"]["augment"]))
    val = CifarDataset(root, False, False)
    for name, ds in (("training", train), ("test", val)):
        top = int(ds.targets.max()) if len(ds) else -1
        if top >= len(classes):
            raise ConfigError(f"{root!r}: a {name} label is {top} but batches.meta names "
                              f"{len(classes)} classes")
    return DataBundle(train, val, len(classes), classes)


def _imagefolder(cfg) -> DataBundle:
    from torchvision import datasets, transforms

    root = _require_root(cfg)
    d = cfg["data"]
    size = int(d["image_size"] or 224)
    resize = int(d["val_resize"] or round(size * 256 / 224))
    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if d["augment"]:
        train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), norm])
    else:
        train_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                                       transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                                 transforms.ToTensor(), norm])
    parts = {}
    for split, tf in (("train", train_tf), ("val", val_tf)):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise ConfigError(f"{root!r} is not an ImageFolder dataset: no {split}/ folder")
        try:
            parts[split] = datasets.ImageFolder(path, transform=tf, loader=load_image)
        except (FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"{path!r}: {e}") from e
    train, val = parts["train"], parts["val"]
    if train.classes != val.classes:
        raise ConfigError(f"{root!r}: train/ has {len(train.classes)} classes but val/ has "
                          f"{len(val.classes)} (or they are named differently)")
    classes = list(train.classes)
    if d["skip_unreadable"]:
        train, val = SkipUnreadable(train), SkipUnreadable(val)
    return DataBundle(train, val, len(classes), classes)


class UnreadableFileError(ConfigError):
    """A data file (an image) that cannot be read. Raised in a DataLoader worker, it reaches the
    main process with the worker's traceback around its message; the message is taken back out."""

    def __init__(self, msg: str):
        if "Original Traceback" in msg:
            tail = [line for line in msg.splitlines() if f"{type(self).__name__}: " in line]
            if tail:
                msg = tail[-1].split(f"{type(self).__name__}: ", 1)[1]
        super().__init__(msg)


def load_image(path: str):
    """torchvision's PIL loader (RGB), decoding the whole image here, so that a damaged file is
    an :class:`UnreadableFileError` that names it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:  # PIL: UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise UnreadableFileError(f"cannot read image {path}: {type(e).__name__}: {e}; remove or replace "
                                  "the file, or set data.skip_unreadable=true to skip such files") from e


class SkipUnreadable(Dataset):
    """An image dataset whose unreadable files are replaced by the next readable sample (with the
    same sample seed, so the run stays deterministic); each one is reported once per process on
    stderr as ``fastnoise: warning: ...`` and listed in :attr:`skipped`."""

    def __init__(self, base: Dataset):
        self.base = base
        self.skipped: list[str] = []
        self.classes = getattr(base, "classes", [])
        self.uses_rng = getattr(base, "uses_rng", True)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        import sys

        n = len(self.base)
        for k in range(n):
            try:
                return self.base[(i + k) % n]
            except UnreadableFileError as e:
                msg = str(e).split("; remove or replace", 1)[0]
                if msg not in self.skipped:
                    self.skipped.append(msg)
                    print(f"fastnoise: warning: skipped unreadable data (data.skip_unreadable): {msg}",
                          file=sys.stderr, flush=True)
        raise UnreadableFileError(f"no readable sample in the dataset ({n} files, all unreadable)")


_BUILDERS = {"digits": _digits, "cifar10": _cifar, "fashion_mnist": _fashion_mnist,
             "imagefolder": _imagefolder, "licenses": _licenses}
DATASETS = tuple(sorted(_BUILDERS))  # the built-in names of data.dataset
LM_DATASETS = frozenset({"licenses"})  # those of token ids (task: causal_lm)

def _is_map_dataset(ds) -> bool:
    return (not isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, "__len__")
            and hasattr(ds, "__getitem__"))


def _count_classes(ds):
    """A dataset's class count from what it says about itself, or None."""
    classes = getattr(ds, "classes", None)
    if classes is not None:
        return len(classes)
    targets = getattr(ds, "targets", None)
    if targets is None and isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
        targets = ds.tensors[1]
    if targets is not None and len(targets):
        return int(torch.as_tensor(targets).max()) + 1
    return None


def _import_data(cfg) -> DataBundle:
    path = cfg["data"]["dataset"]
    build = import_object(path, "data.dataset")
    try:
        out = build(copy.deepcopy(cfg["data"]))
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"data.dataset {path!r} raised {type(e).__name__}: {e}") from e
    if isinstance(out, DataBundle):
        train, val = out.train, out.val
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        train, val = out
    else:
        raise ConfigError(f"data.dataset {path!r} returned {type(out).__name__}; it must return a "
                          "fastnoise.train.data.DataBundle or a (train, val) pair of datasets")
    for split, ds in (("training", train), ("validation", val)):
        if not _is_map_dataset(ds):
            raise ConfigError(f"data.dataset {path!r}: the {split} set is a {type(ds).__name__}, not a "
                              "map-style dataset (__len__ and __getitem__)")
        if len(ds) == 0:
            raise ConfigError(f"data.dataset {path!r}: the {split} set is empty")
        sample = ds[0]
        pair = isinstance(sample, (tuple, list)) and len(sample) == 2
        if not (pair and isinstance(sample[0], torch.Tensor)):
            raise ConfigError(f"data.dataset {path!r}: {split} sample 0 is a {type(sample).__name__}; "
                              "each sample must be an (input tensor, label) pair")
    if isinstance(out, DataBundle):
        return out
    n = cfg["data"]["num_classes"] or _count_classes(train)
    if n is None:
        raise ConfigError(f"data.dataset {path!r}: cannot tell the number of classes (its training "
                          "set has no .classes or .targets): set data.num_classes")
    classes = getattr(train, "classes", None)
    bundle = DataBundle(train, val, int(n), list(classes) if classes is not None else [])
    return bundle


def build_data(cfg) -> DataBundle:
    """Both splits of ``cfg['data']['dataset']``; user errors raise :class:`ConfigError`.

    ``data.dataset`` is a built-in name (:data:`DATASETS`) or an import path
    ``package.module:function``. The function is called with a copy of the ``data`` section
    (a dict: ``root``, ``augment``, ``image_size``, ... as the run has them) and returns either a
    :class:`DataBundle` or a ``(train, val)`` pair of map-style datasets whose samples are
    ``(input tensor, integer label)``; for a pair, the class count is ``data.num_classes`` if set,
    else ``len(train.classes)``, else ``max(train.targets) + 1`` (a ``TensorDataset``'s second
    tensor counts as its targets). Augmentation that draws from torch's global RNG resumes
    exactly (each sample's draw is seeded, see :class:`SeededSamples`); a dataset that draws from
    NumPy's or Python's RNG does not. A dataset with ``uses_rng = False`` is not seeded.
    """
    name = cfg["data"]["dataset"]
    if name is None:
        raise ConfigError("data.dataset is null: the run's data were given in Python (fastnoise.train.fit), "
                          "so they cannot be built from the settings; continue it with fit(..., resume=True)")
    if is_import_path(name):
        bundle = _import_data(cfg)
    elif name in _BUILDERS:
        bundle = _BUILDERS[name](cfg)
    else:
        raise ConfigError(f"data.dataset must be one of {sorted(_BUILDERS)} or an import path "
                          f"package.module:function, got {name!r}")
    if bundle.num_classes < 2:
        raise ConfigError(f"the {name} data has {bundle.num_classes} class(es) {bundle.classes}: "
                          "classification needs at least two")
    return bundle


# ----------------------------------------------------------------------------- data order
def sample_seed(seed: int, epoch: int, index: int) -> int:
    return mix64(seed, epoch, index) & 0x7FFFFFFFFFFFFFFF


class SeededSamples(Dataset):
    """Takes ``(index, seed)`` and returns ``base[index]`` drawn with torch's RNG seeded by ``seed``.

    The caller's RNG state is restored, so augmentation never disturbs (or depends on) the
    process's stream.
    """

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item
        if not getattr(self.base, "uses_rng", True):  # nothing random to seed
            return self.base[index]
        gen = torch.default_generator  # (torch.manual_seed would also seed every accelerator: slow)
        state = gen.get_state()
        gen.manual_seed(seed)
        try:
            return self.base[index]
        finally:
            gen.set_state(state)


class EpochBatchSampler:
    """This rank's share of each global batch of one epoch, from a given step on.

    ``set_epoch(e, start_step)`` picks the epoch's permutation and the first step to yield.
    Each batch is a list of ``(index, sample seed)`` for :class:`SeededSamples`.
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if global_batch % world_size:
            raise ConfigError(f"data.batch_size={global_batch} must be divisible by the number of "
                              f"processes ({world_size})")
        if n < global_batch:
            raise ConfigError(f"data.batch_size={global_batch} is larger than the training set ({n} samples)")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.local_batch = global_batch // world_size
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch  # the last partial batch is dropped

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        assert 0 <= start_step <= self.steps_per_epoch
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(mix64(self.seed, self.epoch) & 0x7FFFFFFFFFFFFFFF)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        b, lb = self.global_batch, self.local_batch
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * b:(step + 1) * b][self.rank * lb:(self.rank + 1) * lb]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in batch]


def _own_generator() -> torch.Generator:
    """Each DataLoader iterator draws a base seed for its workers; from its own generator, not
    torch's global one, which then stays a function of the training steps alone (so a resumed
    run's dropout, say, draws what the uninterrupted run draws). Samples are seeded per index."""
    return torch.Generator().manual_seed(0)


def train_loader(dataset: Dataset, sampler: EpochBatchSampler, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0, generator=_own_generator())


def eval_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """In order, no augmentation; rank ``r`` takes samples ``r, r + W, ...`` (nothing padded)."""
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory, generator=_own_generator())
