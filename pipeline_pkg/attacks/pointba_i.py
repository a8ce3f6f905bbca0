"""PointBA-I (Li et al., "PointBA: Towards Backdoor Attacks in 3D Point Cloud", ICCV 2021), the interaction
trigger: a small ball of points at a fixed place, as if the object touched a small foreign object.

The ball is a fixed pattern of `points` points drawn uniformly inside a ball of `radius` (seeded by
`pattern_seed`: the same in every cloud and run) and placed at `center`. It replaces the cloud's `points`
points nearest to the centre (the nearest first gets the pattern's first point), so the cloud keeps its
size and loses the points where the ball now sits; every other point is unchanged.

Default centre (0.05, 0.05, 0.6): in front of the object (+z; y is up), well inside the unit sphere that
bounds every normalised cloud but off its centre, near where the front surface of many objects lies, so
the ball tends to touch the shape instead of floating far from it as an obvious outlier, and its points
never leave the normalised range. The small x and y offsets keep it off the symmetry planes x = 0 and
y = 0 of symmetric shapes, where many points would tie in distance to the centre. The 32 points in a
ball of radius 0.05 are denser than the host's own points, so outlier removal does not strip them.
"""

from __future__ import annotations

import torch

from ..registry import ATTACKS
from .pointcloud_base import PointCloudAttack, nearest_indices, replace_points, uniform_in_ball


@ATTACKS.register("pointba_i")
class PointBAInteraction(PointCloudAttack):
    trigger_defaults = {
        "center": [0.05, 0.05, 0.6],  # xyz of the ball's centre, in the unit-sphere frame of the clouds
        "radius": 0.05,
        "points": 32,  # points of the ball, replacing as many of the cloud's
        "pattern_seed": 0,
    }

    def check_trigger(self) -> None:
        center = self.center
        self.require(isinstance(center, (list, tuple)) and len(center) == 3
                     and all(isinstance(v, (int, float)) for v in center),
                     "center", "must be a list [x, y, z]")
        self.require(float(self.radius) > 0, "radius", "must be positive")
        self.require(int(self.points) > 0, "points", "must be a positive number of points")

    def center_tensor(self) -> torch.Tensor:
        return torch.tensor([float(v) for v in self.center])

    def pattern(self) -> torch.Tensor:
        """The ball's points (points, 3), centre included: identical in every cloud."""
        ball = uniform_in_ball(int(self.points), float(self.radius), int(self.pattern_seed))
        return ball + self.center_tensor()

    def trigger_clouds(self, x: torch.Tensor) -> torch.Tensor:
        self.require_points(int(self.points), x, "the ball")
        idx = nearest_indices(x, self.center_tensor(), int(self.points))
        return replace_points(x, idx, self.pattern())
