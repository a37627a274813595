"""Architectures the recipes name.

- ``resnet32``: the CIFAR ResNet of He et al. 2016 (section 4.2): a 3x3 stem with 16 channels,
  3 stages of 5 basic blocks with 16 / 32 / 64 channels, stride 2 at the start of stages 2 and
  3, global average pooling and one linear layer (0.46 M parameters). Shortcuts that change
  shape subsample and zero-pad the channels (the paper's option A, parameter free).
- ``resnet50``: torchvision's (its ``state_dict`` keys, so torchvision weight files load).
- ``digits_cnn``: a small convnet for the 8x8 scikit-learn digits (demo).
- ``digits_mlp``: a tiny MLP on the same data, without BatchNorm (fast tests, DDP checks).
- ``fashion_cnn``: a small convnet for 28x28 Fashion-MNIST (:class:`FashionCNN`).
- ``tiny_llama`` (``task: causal_lm``): a byte-level tiny Llama (Hugging Face
  ``LlamaForCausalLM`` from a config built in code: 2 decoder layers 64 wide, 4 heads, 64
  positions; the vocabulary is the data's, 256 for ``licenses``); needs ``transformers``.
- ``package.module:function`` (any name with a colon): the user's own builder, called as
  ``function(num_classes)`` and returning an ``nn.Module``.

Every model exposes the name of its classifier layer (:data:`CLASSIFIER`), so a weight file
whose class count differs can be told apart from one of another architecture, and whether it is
a convnet (:data:`CONVNETS`: channels_last on CUDA). For an import path both are derived from
the model (built once on the meta device, with 10 classes): the classifier is the last
``nn.Linear`` / ``nn.Conv2d`` with 10 outputs (else the last ``nn.Linear``), a convnet is a model
with an ``nn.Conv2d``. A builder can say them itself::

    def build(num_classes):
        return MyNet(num_classes)
    build.classifier = "head"   # the module whose outputs are the logits
    build.convnet = True        # use channels_last on CUDA

The builder may be called more than once (on the meta device to check it, then for real) and
must return a freshly initialised model each time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .importpath import import_object, is_import_path

__all__ = ["ARCHS", "CLASSIFIER", "CONVNETS", "LM_ARCHS", "build_model", "build_to_load", "arch_builder",
           "ResNetCifar", "DigitsCNN", "DigitsMLP", "FashionCNN", "resnet32", "tiny_llama"]


class _ShortcutA(nn.Module):
    """Option A shortcut: take every other pixel and zero-pad the new channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = (_ShortcutA(in_planes, planes, stride) if stride != 1 or in_planes != planes
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``n = 5`` gives ResNet-32."""

    def __init__(self, n: int = 5, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, 2 if (i > 0 and j == 0) else 1))
                in_planes = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet32(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(5, num_classes)


class DigitsCNN(nn.Module):
    """Two 3x3 conv stages on 1x8x8 digits, then two linear layers (38 k parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 16, 64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # [B, 2w, 4, 4]
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc(x)


class DigitsMLP(nn.Module):
    """64 -> hidden -> classes, for tests that need a model that trains in milliseconds."""

    def __init__(self, num_classes: int = 10, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.fc1(x.flatten(1))))


class FashionCNN(nn.Module):
    """Three 3x3 conv stages on 1x28x28 (conv, 2x2 max pool, BatchNorm, ReLU), then two linear
    layers.

    28 -> 14 -> 7 -> 3 pixels, ``widths[2]`` x 3 x 3 features, a hidden layer of ``hidden``. The
    default (16, 32, 64) channels and 128 hidden units have 98 k parameters and 2.0 M
    multiply-adds per image; sized for CPU training (docs/study.md gives its epoch time and
    accuracy). Pooling before BatchNorm and ReLU (the same function when the BN scale is
    positive) makes those two work on a quarter of the pixels: a training step takes ~15%
    less time on the CPU.
    """

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), hidden: int = 128):
        super().__init__()
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(1, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w3)
        self.fc1 = nn.Linear(w3 * 9, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(F.max_pool2d(self.conv1(x), 2)))  # [B, w1, 14, 14]
        x = F.relu(self.bn2(F.max_pool2d(self.conv2(x), 2)))  # [B, w2, 7, 7]
        x = F.relu(self.bn3(F.max_pool2d(self.conv3(x), 2)))  # [B, w3, 3, 3]
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc(x)


def _resnet50(num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


def tiny_llama(num_classes: int = 256) -> nn.Module:
    """A tiny Hugging Face ``LlamaForCausalLM`` with a vocabulary of ``num_classes`` tokens: 2 decoder
    layers 64 wide (MLP 192), 4 attention heads (4 key-value heads), 64 positions (bench/lm_study.py's
    byte-level model). Raises ConfigError naming the package when ``transformers`` is missing."""
    try:
        import transformers
    except ImportError as e:
        from .errors import ConfigError

        raise ConfigError(f"model.arch=tiny_llama needs the transformers package (pip install transformers): "
                          f"{e}") from None
    cfg = transformers.LlamaConfig(vocab_size=num_classes, hidden_size=64, intermediate_size=192,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


ARCHS: dict[str, Callable[[int], nn.Module]] = {
    "digits_mlp": lambda c: DigitsMLP(c),
    "digits_cnn": lambda c: DigitsCNN(c),
    "fashion_cnn": lambda c: FashionCNN(c),
    "resnet32": resnet32,
    "resnet50": _resnet50,
    "tiny_llama": tiny_llama,
}
LM_ARCHS = frozenset({"tiny_llama"})  # causal LMs (task: causal_lm): num_classes is the vocabulary
_CLASSIFIER = {"digits_mlp": "fc", "digits_cnn": "fc", "fashion_cnn": "fc", "resnet32": "fc",
               "resnet50": "fc", "tiny_llama": "lm_head"}
_CONVNETS = frozenset({"digits_cnn", "fashion_cnn", "resnet32", "resnet50"})
_PROBE_CLASSES = 10  # the class count an import-path builder is probed with


def arch_builder(arch: str, what: str = "model.arch") -> Callable[[int], nn.Module]:
    """The builder of a built-in name or an import path (imported; errors name ``what``)."""
    if is_import_path(arch):
        return import_object(arch, what)
    if arch is None:
        from .errors import ConfigError

        raise ConfigError(f"{what} is null: the run's model was given in Python (fastnoise.train.fit), "
                          "so it cannot be built from the settings; continue it with fit(..., resume=True)")
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)} (or an import path "
                         "package.module:function)")
    return ARCHS[arch]


def _call_builder(arch: str, build: Callable, num_classes: int) -> nn.Module:
    from .errors import ConfigError

    try:
        model = build(num_classes)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"model builder {arch!r} raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model builder {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


@functools.lru_cache(maxsize=64)
def probe_import_arch(arch: str) -> tuple[str, bool]:
    """``(classifier name, convnet)`` of an import-path architecture; checks that it builds.

    Builds the model once on the meta device (no memory, no initialisation), or for real on the
    CPU with torch's RNG state put back if the builder cannot run on the meta device.
    """
    build = arch_builder(arch)
    try:
        with torch.device("meta"):
            model = _call_builder(arch, build, _PROBE_CLASSES)
    except Exception:
        with torch.random.fork_rng(devices=[]):
            model = _call_builder(arch, build, _PROBE_CLASSES)
    classifier = getattr(build, "classifier", None)
    if classifier is None:
        heads = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        named = [n for n, m in heads if m.weight.shape[0] == _PROBE_CLASSES]
        linears = [n for n, m in heads if isinstance(m, nn.Linear)]
        classifier = (named or linears or [""])[-1]
    convnet = getattr(build, "convnet", None)
    if convnet is None:
        convnet = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return str(classifier), bool(convnet)


class _Classifiers(Mapping):
    """arch -> name of its classifier layer; import paths are probed (:func:`probe_import_arch`)."""

    def __getitem__(self, arch: str) -> str:
        if is_import_path(arch):
            return probe_import_arch(arch)[0]
        return _CLASSIFIER[arch]

    def __iter__(self) -> Iterator[str]:
        return iter(_CLASSIFIER)

    def __len__(self) -> int:
        return len(_CLASSIFIER)

    def __contains__(self, arch) -> bool:
        return is_import_path(arch) or arch in _CLASSIFIER


class _Convnets:
    """``arch in CONVNETS``: the built-in convnets, and import paths whose model has a Conv2d."""

    def __contains__(self, arch) -> bool:
        if is_import_path(arch):
            return probe_import_arch(arch)[1]
        return arch in _CONVNETS

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(_CONVNETS))

    def __repr__(self) -> str:
        return f"CONVNETS({sorted(_CONVNETS)} + import paths with a Conv2d)"


CLASSIFIER: Mapping = _Classifiers()
CONVNETS = _Convnets()


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised ``arch`` with ``num_classes`` outputs (uses torch's RNG).

    ``arch`` is a built-in name (:data:`ARCHS`) or an import path ``package.module:function``,
    called as ``function(num_classes)``; what it returns must be an ``nn.Module``
    (:class:`~fastnoise.train.recipes.ConfigError` otherwise, naming the path).
    """
    build = arch_builder(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if is_import_path(arch):
        return _call_builder(arch, build, num_classes)
    return build(num_classes)


def build_to_load(arch: str, num_classes: int) -> tuple[nn.Module, bool]:
    """``arch`` to load a weight file into, and whether to load it with ``assign=True``: built on the
    meta device (no memory, no initialisation, torch's RNG untouched) unless the model holds buffers
    its ``state_dict`` lacks (non-persistent ones, such as a rotary embedding's frequencies, which no
    file fills): then built for real, with torch's RNG state put back."""
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    saved = set(model.state_dict())
    if all(name in saved for name, _ in model.named_buffers()):
        return model, True
    with torch.random.fork_rng(devices=[]):
        return build_model(arch, num_classes), False
