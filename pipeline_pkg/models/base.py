"""The shape every architecture shares, so that defenses need no per-architecture copies:
`features` maps an input to the penultimate representation and `classifier` is the final Linear layer.
Defenses that prune the last feature layer (fp) or tune only the classifier (ngf) rely on this split.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..configurable import Configurable


class Classifier(nn.Module):
    features: nn.Module
    classifier: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ModelSpec(Configurable):
    """A registered architecture: its hyper-parameters and how to build it for a given input shape."""

    kind = "arch"
    modalities: tuple[str, ...] = ()

    def build(self, input_shape: Sequence[int], num_classes: int) -> Classifier:
        raise NotImplementedError


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class ImageInput(nn.Module):
    """First module of every image model: stored uint8 pixels become floats centred on 0; float input
    is taken to be in [0, 1] already (what defenses that mix or perturb images pass in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return x * 2.0 - 1.0
