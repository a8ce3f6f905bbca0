"""CONV-5 from the RF1024 paper's released code: a cut-down ResNet that treats an I/Q frame as a
(1, 2, L) image. The released code hard-codes 11 outputs; here the head follows the dataset's classes.
Heavy for a CPU (about 0.4 GMAC per frame): meant for GPU configs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..registry import MODELS
from .base import Classifier, ModelSpec


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class AsImage(nn.Module):
    """(N, 2, L) I/Q frames → (N, 1, 2, L) single-channel images, as the released model expects."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


class Conv5(Classifier):
    def __init__(self, num_classes: int, stem: int = 256, hidden: int = 256):
        super().__init__()
        self.features = nn.Sequential(
            AsImage(),
            nn.Conv2d(1, stem, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
            ResidualBlock(stem, stem, 2),
            ResidualBlock(stem, 2 * stem, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * stem, hidden),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(hidden, num_classes)


@MODELS.register("conv5")
class Conv5Spec(ModelSpec):
    modalities = ("rf",)
    defaults = {"stem": 256, "hidden": 256}

    def build(self, input_shape: Sequence[int], num_classes: int) -> Conv5:
        if len(input_shape) != 2:
            raise ValueError(f"conv5 expects I/Q frames of shape (2, L), got {tuple(input_shape)}")
        return Conv5(num_classes, int(self.stem), int(self.hidden))
