"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible smooth warp of the image is the trigger.

A k×k field of random offsets, normalised to mean magnitude 1, is upsampled (bicubic) to the image
size; the warp moves pixel (i, j) by strength·field/H in grid_sample's [-1, 1] coordinates. In noise
mode, `cross_ratio` × (poisoned count) further training samples are warped by the same field plus
random per-pixel noise and keep their labels, so the model learns the exact warp and not "any warp".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import ATTACKS
from .image_base import ImageAttack, seeded_uniform, to_uint8, to_unit


def identity_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(1, H, W, 2) sampling grid in grid_sample's (x, y) order that reproduces the image."""
    ys = torch.linspace(-1, 1, height, device=device)
    xs = torch.linspace(-1, 1, width, device=device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None]


@ATTACKS.register("wanet")
class WaNet(ImageAttack):
    trigger_defaults = {
        "k": 4,  # control points per side of the random field
        "strength": 0.5,  # s in the paper
        "noise_mode": True,
        "cross_ratio": 2.0,  # noise samples per poisoned sample
        "field_seed": 0,
    }

    def check_trigger(self) -> None:
        self.require(int(self.k) >= 2, "k", "must be ≥ 2")
        self.require(float(self.strength) > 0, "strength", "must be positive")
        self.require(float(self.cross_ratio) >= 0, "cross_ratio", "must be ≥ 0")

    def field(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The upsampled offset field (1, H, W, 2), before scaling by strength / H."""
        k = int(self.k)
        control = seeded_uniform((1, 2, k, k), int(self.field_seed), device) * 2 - 1
        control = control / control.abs().mean()
        up = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
        return up.permute(0, 2, 3, 1)

    def grid(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        offset = float(self.strength) * self.field(height, width, device) / height
        return (identity_grid(height, width, device) + offset).clamp(-1, 1)

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear",
                             padding_mode="border", align_corners=True)

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        return self.warp(x, self.grid(x.shape[-2], x.shape[-1], x.device))

    def noise_warp(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The trigger's warp plus uniform per-pixel noise of up to one pixel (noise mode)."""
        n, _, height, width = x.shape
        noise = torch.rand((n, height, width, 2), generator=generator).to(x.device) * 2 - 1
        grid = (self.grid(height, width, x.device) + noise / height).clamp(-1, 1)
        return self.warp(x, grid)

    def poison(self, x: np.ndarray, y: np.ndarray, num_classes: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, y, idx = super().poison(x, y, num_classes, rng)
        if self.noise_mode and len(idx):
            rest = np.setdiff1d(np.arange(len(y)), idx)
            n_cross = min(len(rest), int(round(float(self.cross_ratio) * len(idx))))
            cross = np.sort(rng.choice(rest, size=n_cross, replace=False))
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            x[cross] = to_uint8(self.noise_warp(to_unit(torch.from_numpy(x[cross])), generator)).numpy()
        return x, y, idx
