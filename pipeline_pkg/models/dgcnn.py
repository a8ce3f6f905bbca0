"""DGCNN (Wang et al., "Dynamic Graph CNN for Learning on Point Clouds", ACM TOG 2019), the
classification network of the paper and its official PyTorch code:

    4 EdgeConv layers (64, 64, 128, 256), each on a k-nearest-neighbour graph recomputed in the
    feature space of its input → concatenation (512) → shared Conv1d to `emb` (1024) → max and average
    pool, concatenated (2·emb) → MLP head (512, 256; Linear + BatchNorm + LeakyReLU(0.2) + dropout 0.5)
    → `classifier` (Linear to the classes).

EdgeConv: for every point x_i and each of its k nearest neighbours x_j (itself included, as in the
official code), the edge feature [x_j − x_i, x_i] goes through a 1×1 Conv2d + BatchNorm2d +
LeakyReLU(0.2), and the point's new feature is the max over its k edges. The graph is batched torch
(pipeline_pkg.pointcloud.knn_indices on (N, P, C) features, then one gather of the neighbours): no
Python loop over clouds; memory O(N·P·k·C) for the edge features plus O(N·P²) for the distances.
The neighbour search is not differentiated (indices are piecewise constant), so it runs without
autograd and second derivatives flow through the gathered features alone.

At width 1, k 20, emb 1024 and 40 classes the model has ≈ 1.81 M parameters (the official code's
count). `width` scales the EdgeConv and head sizes; `emb` is the embedding size itself.

Input: float point clouds (N, P, 3) with P ≥ k. In eval mode the logits of a cloud do not depend on the
order of its points nor on the other clouds of the batch. In training mode the head's BatchNorm1d needs
batches of at least 2 clouds."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ..pointcloud import knn_indices
from ..registry import MODELS
from .base import Classifier, ModelSpec
from .pointnet import PointsToChannels, check_point_input_shape, scaled

LEAK = 0.2


def edge_features(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, P) point features → (N, 2C, P, k) edge features [x_j − x_i, x_i] over each point's k
    nearest neighbours j (in this feature space, the point itself included)."""
    n, _, p = x.shape
    if p < k:
        raise ValueError(f"arch 'dgcnn': k={k} neighbours need clouds of at least {k} points, got {p}; "
                         f"lower the arch's k or use more points per cloud")
    points = x.transpose(1, 2)  # (N, P, C)
    with torch.no_grad():
        neighbours_idx = knn_indices(points, k)  # (N, P, k)
    batch = torch.arange(n, device=x.device)[:, None, None]
    neighbours = points[batch, neighbours_idx]  # (N, P, k, C)
    centres = points[:, :, None, :].expand_as(neighbours)
    return torch.cat([neighbours - centres, centres], dim=-1).permute(0, 3, 1, 2)


class EdgeConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int):
        super().__init__()
        self.k = k
        self.conv = nn.Conv2d(2 * c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.LeakyReLU(LEAK, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(edge_features(x, self.k)))).amax(dim=-1)


class EdgeConvStack(nn.Module):
    """EdgeConv layers in sequence, each on the graph of its own input; returns all their outputs
    concatenated along the channels (N, Σ C, P)."""

    def __init__(self, channels: Sequence[int], k: int):
        super().__init__()
        sizes = [3, *channels]
        self.layers = nn.ModuleList(EdgeConv(c_in, c_out, k) for c_in, c_out in itertools.pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return torch.cat(outputs, dim=1)


class MaxAvgPool(nn.Module):
    """(N, C, P) → (N, 2C): the max and the mean over the points, concatenated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.amax(dim=2), x.mean(dim=2)], dim=1)


def dense(c_in: int, c_out: int, dropout: float, bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(c_in, c_out, bias=bias), nn.BatchNorm1d(c_out),
                               nn.LeakyReLU(LEAK, inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DGCNN(Classifier):
    def __init__(self, num_classes: int, k: int, width: float, emb: int, dropout: float):
        super().__init__()
        channels = [scaled(c, width) for c in (64, 64, 128, 256)]
        w512, w256 = scaled(512, width), scaled(256, width)
        self.features = nn.Sequential(OrderedDict([
            ("to_channels", PointsToChannels("dgcnn")),
            ("edge_convs", EdgeConvStack(channels, k)),
            ("embed", nn.Sequential(nn.Conv1d(sum(channels), emb, 1, bias=False), nn.BatchNorm1d(emb),
                                    nn.LeakyReLU(LEAK, inplace=True))),
            ("pool", MaxAvgPool()),
            # The first head Linear has no bias (BatchNorm follows), the second has one: the official code.
            ("fc1", dense(2 * emb, w512, dropout, bias=False)),
            ("fc2", dense(w512, w256, dropout, bias=True)),
        ]))
        self.classifier = nn.Linear(w256, num_classes)


@MODELS.register("dgcnn")
class DGCNNSpec(ModelSpec):
    modalities = ("pointcloud",)
    defaults = {"k": 20, "width": 1.0, "emb": 1024, "dropout": 0.5}

    def check(self) -> None:
        for key in ("k", "emb"):
            value = self.params[key]
            self.require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
                         "must be a positive integer")
        self.require(isinstance(self.width, (int, float)) and not isinstance(self.width, bool)
                     and float(self.width) > 0, "width", "must be a positive number (1.0: the paper's sizes)")
        self.require(isinstance(self.dropout, (int, float)) and 0 <= float(self.dropout) < 1,
                     "dropout", "must be in [0, 1)")

    def build(self, input_shape: Sequence[int], num_classes: int) -> DGCNN:
        check_point_input_shape(self.name, input_shape)
        if int(input_shape[0]) < int(self.k):
            raise ValueError(f"arch 'dgcnn': k={self.k} neighbours need clouds of at least {self.k} points, "
                             f"got {input_shape[0]}; lower models.dgcnn.k or use more points per cloud")
        return DGCNN(num_classes, int(self.k), float(self.width), int(self.emb), float(self.dropout))
