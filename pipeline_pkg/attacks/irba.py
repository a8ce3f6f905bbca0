"""IRBA (Gao et al., "Imperceptible and Robust Backdoor Attack in 3D Point Cloud", TIFS 2024): the trigger
is a weighted local transformation (WLT), a smooth non-rigid distortion of the whole shape. It adds no
points (nothing for outlier removal to find) and is not a global rotation (which rotation augmentation
would wash out).

The recipe follows the authors' code (github.com/KuofengGao/IRBA, data_utils/WLT.py):
1. `anchors` (16) anchor points by farthest point sampling of each cloud;
2. every anchor transforms the points' offsets from it, as rows, by R·S: R rotates by `rotation_deg` (5)
   about each of x, y and z (R = Rz Ry Rx) and S scales by `scale` (5) — the authors fix these at
   their maxima, so all anchors share one transformation and every poisoned cloud gets the same one;
3. each point's new position is the Nadaraya–Watson blend of its transformed positions, weighted by a
   Gaussian kernel of its distance to each anchor (σ = `sigma`, 0.5; weights normalised over anchors);
4. the result is scaled back to the input's centroid and radius (the authors renormalise every cloud to
   the unit sphere after the WLT, the same for unit-normalised clouds).
With one shared transformation A = R·S the blend is exactly c(p) + (p − c(p))·A, where c(p) is the kernel-
weighted mean of the anchors seen from p: the offsets from a smoothly varying local centre are stretched.

Where the authors start the sampling at a seeded random point index, this starts at the point farthest
from the cloud's centroid, so the trigger depends on the shape only and not on the order of its points.
"""

from __future__ import annotations

import torch

from ..pointcloud import degrees, farthest_point_indices, gather_points, rotation_matrix
from ..registry import ATTACKS
from .pointcloud_base import PointCloudAttack


def match_frame(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """x (N, P, 3) moved and uniformly scaled so each cloud's centroid and farthest-point distance from it
    equal those of the matching `reference` cloud."""
    def centre_radius(clouds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centre = clouds.mean(dim=1, keepdim=True)
        return centre, (clouds - centre).norm(dim=-1).amax(dim=1)[:, None, None].clamp_min(1e-12)

    centre, radius = centre_radius(x)
    ref_centre, ref_radius = centre_radius(reference)
    return (x - centre) * (ref_radius / radius) + ref_centre


@ATTACKS.register("irba")
class IRBA(PointCloudAttack):
    trigger_defaults = {
        "anchors": 16,
        "sigma": 0.5,  # Gaussian kernel width, in the clouds' (unit-sphere) units
        "rotation_deg": 5.0,  # rotation about each of x, y, z at every anchor
        "scale": 5.0,  # scaling factor at every anchor (1 = none)
    }

    def check_trigger(self) -> None:
        self.require(int(self.anchors) > 0, "anchors", "must be a positive number of anchor points")
        self.require(float(self.sigma) > 0, "sigma", "must be positive")
        self.require(float(self.scale) > 0, "scale",
                     "must be a positive scaling factor (1 leaves sizes as they are)")

    def anchor_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Indices (N, anchors) of the anchors: farthest point sampling from the point farthest from the
        centroid."""
        self.require_points(int(self.anchors), x, "anchor sampling")
        start = (x - x.mean(dim=1, keepdim=True)).norm(dim=-1).argmax(dim=1)
        return farthest_point_indices(x, int(self.anchors), start)

    def local_transform(self) -> torch.Tensor:
        """The 3×3 matrix A = R·S that multiplies an offset from an anchor written as a row (p − a)·A."""
        angle = degrees(self.rotation_deg)
        rotation = rotation_matrix("z", angle) @ rotation_matrix("y", angle) @ rotation_matrix("x", angle)
        return rotation * float(self.scale)

    def anchor_weights(self, x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Kernel weights (N, P, anchors) of every point for every anchor, summing to 1 over the anchors.
        As a softmax of −d²/2σ², so a tiny σ gives the nearest anchor weight 1 instead of 0/0."""
        sq_dist = (x[:, :, None] - anchors[:, None]).pow(2).sum(-1)
        return torch.softmax(-sq_dist / (2 * float(self.sigma) ** 2), dim=-1)

    def local_warp(self, x: torch.Tensor) -> torch.Tensor:
        """The WLT before renormalisation: Σ_m w_m(p) · (a_m + (p − a_m)·A) for every point p."""
        anchors = gather_points(x, self.anchor_indices(x))
        local_centre = self.anchor_weights(x, anchors) @ anchors
        return local_centre + (x - local_centre) @ self.local_transform().to(x)

    def trigger_clouds(self, x: torch.Tensor) -> torch.Tensor:
        return match_frame(self.local_warp(x), x)
