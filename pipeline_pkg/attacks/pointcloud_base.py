"""The shared part of point-cloud attacks: batches are float (N, P, 3) clouds (y up), a trigger returns a
moved copy of the same shape, dtype and device; plus the fixed seeded patterns and the point replacement
that the inserted-points triggers (PointBA-I, PCBA) share. Replacing points instead of appending them
keeps P fixed, so triggered clouds fit the same arrays and models as clean ones."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..pointcloud import check_clouds
from .base import Attack

# Clouds per slice when a trigger needs P × P distances or per-anchor weights: bounded memory for any N.
CLOUDS_PER_SLICE = 256


class PointCloudAttack(Attack):
    modalities: ClassVar[tuple[str, ...]] = ("pointcloud",)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        check_clouds(x, f"attack {self.name!r}")
        if not len(x):
            return x.clone()
        out = torch.cat([self.trigger_clouds(x[i:i + CLOUDS_PER_SLICE])
                         for i in range(0, len(x), CLOUDS_PER_SLICE)])
        return out.to(x.dtype)

    def trigger_clouds(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger on a non-empty float batch (N, P, 3); must not modify `x` in place."""
        raise NotImplementedError

    def require_points(self, count: int, x: torch.Tensor, what: str) -> None:
        if count > x.shape[1]:
            raise ValueError(f"attack {self.name!r}: {what} needs {count} points but the clouds have only "
                             f"{x.shape[1]}; lower it")


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator: the same draws on every device and run for the same seed."""
    return torch.Generator().manual_seed(int(seed))


def uniform_in_ball(count: int, radius: float, seed: int) -> torch.Tensor:
    """`count` points (count, 3) uniformly distributed inside a ball of `radius` at the origin:
    directions uniform on the sphere, distance radius · u^(1/3) (the volume grows with r³)."""
    gen = seeded_generator(seed)
    directions = torch.randn(count, 3, generator=gen, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    distance = radius * torch.rand(count, 1, generator=gen, dtype=torch.float64).pow(1.0 / 3.0)
    return (directions * distance).float()


def on_unit_sphere(count: int, seed: int) -> torch.Tensor:
    """`count` points (count, 3) uniformly distributed on the unit sphere's surface."""
    directions = torch.randn(count, 3, generator=seeded_generator(seed), dtype=torch.float64)
    return (directions / directions.norm(dim=1, keepdim=True)).float()


def nearest_indices(x: torch.Tensor, center: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (N, count) of each cloud's `count` points nearest to `center` (3,), nearest first; a stable
    sort breaks ties by point index, so the choice is the same on every device."""
    dist = (x - center.to(x)).pow(2).sum(-1)
    return torch.argsort(dist, dim=1, stable=True)[:, :count]


def replace_points(x: torch.Tensor, idx: torch.Tensor, new_points: torch.Tensor) -> torch.Tensor:
    """A copy of x (N, P, 3) whose points at idx (N, K) are new_points (N, K, 3) or (K, 3), in that order."""
    new_points = new_points.to(x).expand(len(x), idx.shape[1], 3)
    return x.scatter(1, idx[..., None].expand(-1, -1, 3), new_points)
