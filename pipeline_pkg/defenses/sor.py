"""`sor`: statistical outlier removal (Rusu et al., 2008) of every input point cloud at test time, the
standard pre-processing defense against point-cloud attacks that add points (PCBA was designed to survive
it: its trigger cluster is as dense as the object's surface).

For each point, the mean distance to its `neighbors` nearest neighbours is computed; points whose mean
distance exceeds the cloud's average by more than `std_ratio` standard deviations are removed (Open3D's
PointCloud.remove_statistical_outlier, on the CPU). The model is left untouched: the defense returns it
wrapped in the filter. A batch stays a tensor of P points per cloud: each cloud's removed points are
replaced by repeating its kept points in order (kept[0], kept[1], ...), which changes nothing for the
max-pooling point networks and keeps the choice deterministic. The points are gathered from the input, so
gradients flow to the kept points (an adaptive attack can differentiate through the filter).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..pointcloud import check_clouds, gather_points
from ..registry import DEFENSES
from .base import Defense


def outlier_filter_indices(x: torch.Tensor, neighbors: int, std_ratio: float) -> torch.Tensor:
    """Indices (N, P) into each cloud of x (N, P, 3): its points that statistical outlier removal keeps,
    in their order, then those kept points again, cyclically, until there are P."""
    import open3d as o3d

    clouds = x.detach().to("cpu", torch.float64).numpy()
    n, p, _ = clouds.shape
    picked = np.empty((n, p), dtype=np.int64)
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        for i, cloud in enumerate(clouds):
            _, kept = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(cloud)).remove_statistical_outlier(
                nb_neighbors=neighbors, std_ratio=std_ratio)
            kept = np.asarray(kept, dtype=np.int64)
            # Open3D keeps nothing of a degenerate cloud (under 3 points, or all points equal: no spread
            # to measure outliers against); such a cloud has no outliers and passes unchanged.
            picked[i] = np.resize(kept, p) if len(kept) else np.arange(p)
    return torch.from_numpy(picked).to(x.device)


class SORFiltered(nn.Module):
    """`model` behind statistical outlier removal of each input cloud."""

    def __init__(self, model: nn.Module, neighbors: int, std_ratio: float):
        super().__init__()
        self.model = model
        self.neighbors = int(neighbors)
        self.std_ratio = float(std_ratio)
        self.train(model.training)

    def filter(self, x: torch.Tensor) -> torch.Tensor:
        check_clouds(x, "defense 'sor'")
        return gather_points(x, outlier_filter_indices(x, self.neighbors, self.std_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.filter(x))

    def extra_repr(self) -> str:
        return f"neighbors={self.neighbors}, std_ratio={self.std_ratio}"


@DEFENSES.register("sor")
class StatisticalOutlierRemoval(Defense):
    # A test-time input filter: the pipeline stores the inner model's weights plus this defense's
    # parameters and re-wraps the model with `wrap` when it loads it.
    test_time = True
    modalities = ("pointcloud",)
    method_defaults = {
        "neighbors": 20,  # nearest neighbours whose mean distance is each point's statistic
        "std_ratio": 2.0,  # remove points beyond mean + std_ratio * std of that statistic
    }

    def check_method(self) -> None:
        neighbors = self.params["neighbors"]
        self.require(isinstance(neighbors, int) and not isinstance(neighbors, bool) and neighbors >= 1,
                     "neighbors", "must be a positive integer")
        self.positive("std_ratio")

    def wrap(self, model: nn.Module) -> SORFiltered:
        return SORFiltered(model, int(self.neighbors), float(self.std_ratio))

    def purify(self, model, x, y, *, seed, log=None):
        if not (x.ndim == 3 and x.shape[-1] == 3 and x.is_floating_point()):
            raise ValueError(f"defense 'sor' filters point clouds, float (N, P, 3), but the clean data is "
                             f"{x.dtype} {tuple(x.shape)}: use it only with point-cloud datasets")
        self.tunable_parameters = 0
        return self.wrap(model)
