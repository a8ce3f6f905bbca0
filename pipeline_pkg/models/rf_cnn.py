"""A small 1-D CNN for I/Q frames: fast enough to train the default RF pipeline on 2 CPU cores."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..registry import MODELS
from .base import Classifier, ModelSpec


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
    )


class RFCNN(Classifier):
    def __init__(self, in_channels: int, num_classes: int, width: int, hidden: int):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width, 7, 2),
            conv_bn_relu(width, width, 5, 2),
            conv_bn_relu(width, 2 * width, 5, 2),
            conv_bn_relu(2 * width, 2 * width, 3, 2),
            conv_bn_relu(2 * width, 4 * width, 3, 2),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(4 * width, hidden),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(hidden, num_classes)


@MODELS.register("rf_cnn")
class RFCNNSpec(ModelSpec):
    modalities = ("rf",)
    defaults = {"width": 32, "hidden": 64}

    def check(self) -> None:
        self.require(int(self.width) > 0, "width", "must be a positive integer")
        self.require(int(self.hidden) > 0, "hidden", "must be a positive integer")

    def build(self, input_shape: Sequence[int], num_classes: int) -> RFCNN:
        return RFCNN(input_shape[0], num_classes, int(self.width), int(self.hidden))
