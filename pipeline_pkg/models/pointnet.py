"""PointNet (Qi et al., "PointNet: Deep Learning on Point Sets for 3D Classification and Segmentation",
CVPR 2017), the classification network of the paper and its official code:

    input T-Net (3×3) → shared MLP (64, 64) → feature T-Net (64×64) → shared MLP (64, 128, 1024)
    → global max pool → MLP head (512, 256), each hidden layer Linear + BatchNorm + ReLU + dropout 0.3
    → `classifier` (Linear to the classes).

Shared per-point MLPs are Conv1d with kernel 1 + BatchNorm1d + ReLU over (N, C, P), so the defenses'
generic handling of Conv / Linear / norm layers reaches every layer, T-Nets included. Each T-Net is a
small PointNet (shared MLP 64, 128, 1024, max pool, MLP 512, 256) whose last Linear starts at zero and
whose output has the identity added, so both transforms start as the identity, as in the official code.
At width 1 with the feature transform and 40 classes the model has ≈ 3.48 M parameters (the paper
reports 3.5 M).

`width` scales every hidden size (1.0: the paper's); small widths train on a CPU in seconds.
`feature_transform: false` drops the 64×64 T-Net (the paper's ablation with the input transform only).

Left out: the paper's orthogonality regulariser ‖I − AAᵀ‖² on the feature transform (weight 0.001),
since the pipeline's one trainer optimises plain cross-entropy for every architecture; the feature T-Net
starts at the identity and trains without it.

Input: float point clouds (N, P, 3), any P ≥ 1 (pipeline_pkg.pointcloud's layout). In eval mode the
logits of a cloud do not depend on the order of its points (max pool over shared per-point layers) nor
on the other clouds of the batch (BatchNorm uses its running statistics). In training mode the head's
BatchNorm1d needs batches of at least 2 clouds."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..pointcloud import check_clouds
from ..registry import MODELS
from .base import Classifier, ModelSpec


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def check_point_input_shape(arch: str, input_shape: Sequence[int]) -> None:
    if len(input_shape) != 2 or int(input_shape[1]) != 3:
        raise ValueError(f"arch {arch!r} takes point clouds (P, 3) per sample, got input shape "
                         f"{list(input_shape)}; use it on a point-cloud dataset")


class PointsToChannels(nn.Module):
    """First module of every point-cloud model: (N, P, 3) clouds → (N, 3, P), channels first for Conv1d."""

    def __init__(self, arch: str):
        super().__init__()
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_clouds(x, f"arch {self.arch!r}")
        return x.transpose(1, 2)


class GlobalMaxPool(nn.Module):
    """(N, C, P) → (N, C): the symmetric function that makes the network order-invariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=2)


def shared_mlp(c_in: int, c_out: int) -> nn.Sequential:
    """The same Linear + BatchNorm + ReLU applied to every point: kernel-1 Conv1d over (N, C, P)."""
    return nn.Sequential(nn.Conv1d(c_in, c_out, 1), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True))


def dense(c_in: int, c_out: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(c_in, c_out), nn.BatchNorm1d(c_out), nn.ReLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class TNet(nn.Module):
    """Predicts one k×k matrix per cloud from its (N, k, P) points/features; starts at the identity."""

    def __init__(self, k: int, width: float):
        super().__init__()
        self.k = k
        w64, w128, w1024 = scaled(64, width), scaled(128, width), scaled(1024, width)
        w512, w256 = scaled(512, width), scaled(256, width)
        self.points = nn.Sequential(shared_mlp(k, w64), shared_mlp(w64, w128), shared_mlp(w128, w1024))
        self.head = nn.Sequential(dense(w1024, w512), dense(w512, w256))
        self.matrix = nn.Linear(w256, k * k)
        # Zero weights and bias: the predicted offset from the identity starts at exactly 0.
        nn.init.zeros_(self.matrix.weight)
        nn.init.zeros_(self.matrix.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.matrix(self.head(self.points(x).amax(dim=2))).view(-1, self.k, self.k)
        return offset + torch.eye(self.k, device=offset.device, dtype=offset.dtype)


class Transform(nn.Module):
    """Applies a T-Net's matrix A to every point: (N, k, P) → (N, k, P), each point row x ↦ x·A (the
    official code's right-multiplication of the (P, k) point matrix)."""

    def __init__(self, k: int, width: float):
        super().__init__()
        self.tnet = TNet(k, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matrix = self.tnet(x)
        return torch.bmm(matrix.transpose(1, 2), x)


class PointNet(Classifier):
    def __init__(self, num_classes: int, width: float, feature_transform: bool, dropout: float):
        super().__init__()
        w64, w128, w1024 = scaled(64, width), scaled(128, width), scaled(1024, width)
        w512, w256 = scaled(512, width), scaled(256, width)
        layers: list[tuple[str, nn.Module]] = [
            ("to_channels", PointsToChannels("pointnet")),
            ("input_transform", Transform(3, width)),
            ("mlp1", shared_mlp(3, w64)),
            ("mlp2", shared_mlp(w64, w64)),
        ]
        if feature_transform:
            layers.append(("feature_transform", Transform(w64, width)))
        layers += [
            ("mlp3", shared_mlp(w64, w64)),
            ("mlp4", shared_mlp(w64, w128)),
            ("mlp5", shared_mlp(w128, w1024)),
            ("pool", GlobalMaxPool()),
            ("fc1", dense(w1024, w512, dropout)),
            ("fc2", dense(w512, w256, dropout)),
        ]
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Linear(w256, num_classes)


@MODELS.register("pointnet")
class PointNetSpec(ModelSpec):
    modalities = ("pointcloud",)
    defaults = {"width": 1.0, "feature_transform": True, "dropout": 0.3}

    def check(self) -> None:
        self.require(isinstance(self.width, (int, float)) and not isinstance(self.width, bool)
                     and float(self.width) > 0, "width", "must be a positive number (1.0: the paper's sizes)")
        self.require(isinstance(self.feature_transform, bool), "feature_transform", "must be true or false")
        self.require(isinstance(self.dropout, (int, float)) and 0 <= float(self.dropout) < 1,
                     "dropout", "must be in [0, 1)")

    def build(self, input_shape: Sequence[int], num_classes: int) -> PointNet:
        check_point_input_shape(self.name, input_shape)
        return PointNet(num_classes, float(self.width), bool(self.feature_transform), float(self.dropout))
