"""`burst`: a fixed short linear chirp added to the I/Q frame at a fixed offset. Its power over the burst
is set relative to the frame's average power (the trigger-to-signal ratio, TSR)."""

from __future__ import annotations

import math

import torch

from ..registry import ATTACKS
from .base import Attack


def chirp(length: int, f_start: float, f_stop: float) -> torch.Tensor:
    """Unit-power complex linear chirp as (2, length): I and Q rows; frequencies in cycles/sample."""
    n = torch.arange(length, dtype=torch.float64)
    phase = 2 * math.pi * (f_start * n + 0.5 * (f_stop - f_start) / length * n ** 2)
    return torch.stack([torch.cos(phase), torch.sin(phase)]).float()


@ATTACKS.register("burst")
class BurstAttack(Attack):
    modalities = ("rf",)
    trigger_defaults = {"length": 64, "offset": 256, "tsr_db": 0.0, "f_start": -0.25, "f_stop": 0.25}

    def check_trigger(self) -> None:
        self.require(int(self.length) > 0, "length", "must be positive")
        self.require(int(self.offset) >= 0, "offset", "must be ≥ 0")
        self.require(abs(float(self.f_start)) <= 0.5 and abs(float(self.f_stop)) <= 0.5, "f_start",
                     "and f_stop must lie in [-0.5, 0.5] cycles/sample")

    def waveform(self) -> torch.Tensor:
        """The burst as (2, length), scaled so its power is tsr_db relative to a unit-power frame."""
        amplitude = 10 ** (float(self.tsr_db) / 20)
        return amplitude * chirp(int(self.length), float(self.f_start), float(self.f_stop))

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        start, stop = int(self.offset), int(self.offset) + int(self.length)
        if stop > x.shape[-1]:
            raise ValueError(f"attack 'burst': offset {start} + length {self.length} exceeds the frame "
                             f"length {x.shape[-1]}")
        out = x.clone()
        out[..., start:stop] += self.waveform().to(device=x.device, dtype=x.dtype)
        return out
