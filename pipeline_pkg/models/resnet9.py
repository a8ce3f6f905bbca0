"""A ResNet-9-class net for quick image runs (the design behind the fast CIFAR-10 training records):
three stages of conv–pool–BN–ReLU, residual blocks after the first and last, a global max pool."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..registry import MODELS
from .base import Classifier, ImageInput, ModelSpec


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class ResNet9(Classifier):
    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            ImageInput(),
            conv_bn(in_channels, w),
            conv_bn(w, 2 * w, pool=True), Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True),
            conv_bn(4 * w, 8 * w, pool=True), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(8 * w, num_classes)


@MODELS.register("resnet9")
class ResNet9Spec(ModelSpec):
    modalities = ("image",)
    defaults = {"width": 64}  # channels of the first stage; 64 is the usual ResNet-9

    def check(self) -> None:
        self.require(int(self.width) > 0, "width", "must be a positive integer")

    def build(self, input_shape: Sequence[int], num_classes: int) -> ResNet9:
        return ResNet9(input_shape[0], num_classes, int(self.width))
