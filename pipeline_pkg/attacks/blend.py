"""Blended injection (Chen et al., 2017): a fixed random pattern mixed into the whole image at ratio α."""

from __future__ import annotations

import torch

from ..registry import ATTACKS
from .image_base import ImageAttack, seeded_uniform


@ATTACKS.register("blend")
class Blend(ImageAttack):
    trigger_defaults = {"alpha": 0.2, "pattern_seed": 0}

    def check_trigger(self) -> None:
        self.require(0.0 < float(self.alpha) <= 1.0, "alpha", "must be in (0, 1]")

    def pattern(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Uniform noise in [0, 1] of one image's shape (C, H, W), fixed by `pattern_seed`."""
        return seeded_uniform(tuple(shape), int(self.pattern_seed), device)

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        alpha = float(self.alpha)
        return (1.0 - alpha) * x + alpha * self.pattern(x.shape[1:], x.device)
