"""PreAct-ResNet18 (He et al., 2016, identity mappings): the standard architecture of backdoor
benchmarks on 32×32 images — a 3×3 stem without pooling, four stages of two pre-activation blocks."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .base import Classifier, ImageInput, ModelSpec


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, as in the paper's design.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(Classifier):
    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = [ImageInput(), nn.Conv2d(in_channels, width, 3, padding=1, bias=False)]
        c_in = width
        for stage, c_out in enumerate(widths):
            for block in range(2):
                layers.append(PreActBlock(c_in, c_out, stride=2 if stage > 0 and block == 0 else 1))
                c_in = c_out
        layers += [nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)


@MODELS.register("preact_resnet18")
class PreActResNet18Spec(ModelSpec):
    modalities = ("image",)
    defaults = {"width": 64}  # 64 is the standard net (11.2 M parameters on CIFAR-10)

    def check(self) -> None:
        self.require(int(self.width) > 0, "width", "must be a positive integer")

    def build(self, input_shape: Sequence[int], num_classes: int) -> PreActResNet18:
        return PreActResNet18(input_shape[0], num_classes, int(self.width))
