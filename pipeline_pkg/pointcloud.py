"""Point-cloud geometry shared by the point-cloud datasets, models and attacks, as batched torch
operations (no per-cloud Python loop, so they run on the GPU as well as the CPU).

A batch of point clouds is a float tensor (N, P, 3): N clouds of P points, xyz last, y the up axis
(the layout of the ModelNet40 HDF5 release)."""

from __future__ import annotations

import math

import torch

AXES = {"x": 0, "y": 1, "z": 2}


def check_clouds(x: torch.Tensor, who: str) -> None:
    if x.ndim != 3 or x.shape[-1] != 3 or not x.is_floating_point():
        raise ValueError(f"{who}: expected float point clouds (N, P, 3), got {x.dtype} {tuple(x.shape)}")


def normalize_unit_sphere(x: torch.Tensor) -> torch.Tensor:
    """Centre each cloud on its centroid and scale it so its farthest point lies on the unit sphere."""
    centred = x - x.mean(dim=1, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=1).clamp_min(1e-12)
    return centred / radius[:, None, None]


def farthest_point_indices(x: torch.Tensor, count: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (N, count) of farthest point sampling: each pick is the point farthest from those picked
    before it. Starts at point 0 of every cloud unless `start` (N,) says otherwise, so it is deterministic."""
    n, p, _ = x.shape
    if not 0 < count <= p:
        raise ValueError(f"farthest point sampling: cannot pick {count} of {p} points")
    picked = torch.empty(n, count, dtype=torch.long, device=x.device)
    current = torch.zeros(n, dtype=torch.long, device=x.device) if start is None else start.to(x.device)
    nearest = torch.full((n, p), float("inf"), dtype=x.dtype, device=x.device)
    rows = torch.arange(n, device=x.device)
    for i in range(count):
        picked[:, i] = current
        nearest = torch.minimum(nearest, (x - x[rows, current][:, None]).pow(2).sum(-1))
        current = nearest.argmax(dim=1)
    return picked


def gather_points(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (N, P, C) at indices idx (N, K) → (N, K, C)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def farthest_point_sample(x: torch.Tensor, count: int) -> torch.Tensor:
    return gather_points(x, farthest_point_indices(x, count))


def knn_indices(x: torch.Tensor, k: int, include_self: bool = True) -> torch.Tensor:
    """Indices (N, P, k) of each point's k nearest neighbours in its cloud (itself first when included).
    x is (N, P, D) for any feature dimension D (DGCNN searches in feature space)."""
    dist = torch.cdist(x, x)
    k_total = k if include_self else k + 1
    idx = dist.topk(k_total, dim=-1, largest=False).indices
    return idx if include_self else idx[..., 1:]


def mean_knn_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean distance (N, P) of each point to its k nearest other points: the statistic statistical outlier
    removal thresholds and PCBA matches its trigger cluster to."""
    dist = torch.cdist(x, x)
    return dist.topk(k + 1, dim=-1, largest=False).values[..., 1:].mean(-1)


def rotation_matrix(axis: str | torch.Tensor, angle_rad: float | torch.Tensor) -> torch.Tensor:
    """3×3 rotation by `angle_rad` about a named axis ('x', 'y', 'z') or a unit vector (Rodrigues)."""
    if isinstance(axis, str):
        if axis not in AXES:
            raise ValueError(f"rotation axis must be one of {sorted(AXES)}, got {axis!r}")
        vector = torch.zeros(3)
        vector[AXES[axis]] = 1.0
    else:
        vector = axis.float() / axis.float().norm()
    angle = torch.as_tensor(angle_rad, dtype=torch.float32)
    kx, ky, kz = vector.tolist()
    cross = torch.tensor([[0.0, -kz, ky], [kz, 0.0, -kx], [-ky, kx, 0.0]])
    return torch.eye(3) + torch.sin(angle) * cross + (1 - torch.cos(angle)) * cross @ cross


def degrees(value: float) -> float:
    return math.radians(float(value))
