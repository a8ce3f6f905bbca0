"""SIG (Barni et al., 2019): a horizontal sinusoid added to target-class images, labels untouched
(clean label); at test time the same signal on any image triggers the target class."""

from __future__ import annotations

import math

import torch

from ..registry import ATTACKS
from .image_base import ImageAttack


@ATTACKS.register("sig")
class SIG(ImageAttack):
    clean_label = True
    # Only target-class samples can carry a clean-label trigger: with 10 balanced classes at most 10% of
    # the training set is eligible, so the default poisons half of the target class.
    poison_defaults = {"rate": 0.05, "target": 0, "mode": "all_to_one"}
    trigger_defaults = {"delta": 20.0, "frequency": 6.0}  # amplitude in 0..255 units; periods per width

    def check_trigger(self) -> None:
        self.require(0 < float(self.delta) <= 255, "delta", "must be in (0, 255]")
        self.require(float(self.frequency) > 0, "frequency", "must be positive")
        self.require(self.mode == "all_to_one", "mode", "must be all_to_one: a clean-label attack has one target")

    def signal(self, width: int, device: torch.device) -> torch.Tensor:
        """delta/255 · sin(2π·j·f / width) for columns j, in [0, 1] units."""
        cols = torch.arange(width, device=device, dtype=torch.float32)
        return float(self.delta) / 255.0 * torch.sin(2 * math.pi * cols * float(self.frequency) / width)

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.signal(x.shape[-1], x.device)
