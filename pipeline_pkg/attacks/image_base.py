"""The shared part of image attacks: batches are stored as uint8 (N, C, H, W); a trigger is defined on
floats in [0, 1] and the result is rounded back to uint8, so poisoned files hold what a camera could."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Attack


def to_unit(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.uint8:
        raise TypeError(f"image triggers expect uint8 batches (N, C, H, W), got {x.dtype}")
    return x.float() / 255.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


class ImageAttack(Attack):
    modalities: ClassVar[tuple[str, ...]] = ("image",)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"attack {self.name!r}: expected images (N, C, H, W), got shape {tuple(x.shape)}")
        return to_uint8(self.trigger_float(to_unit(x)))

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger on float images in [0, 1]; may leave [0, 1] (the caller clamps)."""
        raise NotImplementedError


def seeded_uniform(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """A fixed pattern: the same values on every device and run for the same seed."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(shape, generator=gen).to(device)
