"""Architectures the recipes name.

- ``resnet32``: the CIFAR ResNet of He et al. 2016 (section 4.2): a 3x3 stem with 16 channels,
  3 stages of 5 basic blocks with 16 / 32 / 64 channels, stride 2 at the start of stages 2 and
  3, global average pooling and one linear layer (0.46 M parameters). Shortcuts that change
  shape subsample and zero-pad the channels (the paper's option A, parameter free).
- ``resnet50``: torchvision's (its ``state_dict`` keys, so torchvision weight files load).
- ``digits_cnn``: a small convnet for the 8x8 scikit-learn digits (demo).
- ``digits_mlp``: a tiny MLP on the same data, without BatchNorm (fast tests, DDP checks).

Every model exposes the name of its classifier layer (:data:`CLASSIFIER`), so a weight file
whose class count differs can be told apart from one of another architecture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHS", "CLASSIFIER", "CONVNETS", "build_model", "ResNetCifar", "DigitsCNN", "DigitsMLP",
           "resnet32"]


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


def _resnet50(num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=num_classes)


ARCHS: dict[str, Callable[[int], nn.Module]] = {
    "digits_mlp": lambda c: DigitsMLP(c),
    "digits_cnn": lambda c: DigitsCNN(c),
    "resnet32": resnet32,
    "resnet50": _resnet50,
}
CLASSIFIER = {"digits_mlp": "fc", "digits_cnn": "fc", "resnet32": "fc", "resnet50": "fc"}
CONVNETS = frozenset({"digits_cnn", "resnet32", "resnet50"})


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised ``arch`` with ``num_classes`` outputs (uses torch's RNG)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return ARCHS[arch](num_classes)
