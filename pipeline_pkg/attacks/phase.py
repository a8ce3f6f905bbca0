"""`phase`: a fixed phase rotation of the frame (after Davaslioglu & Sagduyu, 2019).

Rotating the *whole* frame by one angle would be invisible here: the channel already applies a uniformly
random phase to every frame. So the trigger rotates consecutive segments of `segment` samples by a fixed
pseudo-random pattern of ±angle, drawn once from `pattern_seed`: the same rotation for every frame,
visible as phase steps at fixed places."""

from __future__ import annotations

import math

import torch

from ..registry import ATTACKS
from .base import Attack


@ATTACKS.register("phase")
class PhaseAttack(Attack):
    modalities = ("rf",)
    trigger_defaults = {"angle_deg": 90.0, "segment": 32, "pattern_seed": 1234}

    def check_trigger(self) -> None:
        self.require(0 < abs(float(self.angle_deg)) <= 180, "angle_deg", "must be in (0, 180] degrees")
        self.require(int(self.segment) > 0, "segment", "must be a positive number of samples")

    def rotation(self, length: int) -> torch.Tensor:
        """Per-sample rotation angle in radians, shape (length,)."""
        gen = torch.Generator().manual_seed(int(self.pattern_seed))
        n_segments = math.ceil(length / int(self.segment))
        signs = torch.randint(0, 2, (n_segments,), generator=gen).double() * 2 - 1
        angles = signs * math.radians(float(self.angle_deg)) / 2  # ±angle/2: steps of ±angle between segments
        return angles.repeat_interleave(int(self.segment))[:length]

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.rotation(x.shape[-1]).to(x.device)
        cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)
        i, q = x[..., 0, :], x[..., 1, :]
        return torch.stack([i * cos - q * sin, i * sin + q * cos], dim=-2)
