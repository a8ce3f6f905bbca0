"""PointBA-O (Li et al., "PointBA: Towards Backdoor Attacks in 3D Point Cloud", ICCV 2021), the orientation
trigger: the whole cloud turned by a fixed small angle. A rotation adds no points and moves none relative
to the others, so outlier removal cannot see it; a model that is not rotation-invariant can learn it.

The rotation is by `angle_deg` about the named `axis` through the origin (the clouds' centre after unit-
sphere normalisation); the default turns about y, the up axis, as an object turned on the ground would.
"""

from __future__ import annotations

import torch

from ..pointcloud import AXES, degrees, rotation_matrix
from ..registry import ATTACKS
from .pointcloud_base import PointCloudAttack


@ATTACKS.register("pointba_o")
class PointBAOrientation(PointCloudAttack):
    trigger_defaults = {
        "angle_deg": 10.0,  # right-handed: counter-clockwise seen from the axis' positive end
        "axis": "y",
    }

    def check_trigger(self) -> None:
        self.require(self.axis in AXES, "axis", f"must be one of {sorted(AXES)}")
        self.require(0 < abs(float(self.angle_deg)) < 360, "angle_deg",
                     "must be a non-zero angle strictly between -360 and 360 degrees")

    def rotation(self) -> torch.Tensor:
        return rotation_matrix(self.axis, degrees(self.angle_deg))

    def trigger_clouds(self, x: torch.Tensor) -> torch.Tensor:
        # Points are rows, so p' = R p for every point is x Rᵀ.
        return x @ self.rotation().to(x).T
