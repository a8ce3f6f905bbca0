"""BppAttack (Wang et al., CVPR 2022): the trigger is colour quantisation to a few levels per channel,
with Floyd–Steinberg dithering so that the image still looks natural. (The paper's extra adversarial
"negative" samples during training are not part of this poisoning.)"""

from __future__ import annotations

import torch

from ..registry import ATTACKS
from .image_base import ImageAttack

# Floyd–Steinberg: share of the quantisation error passed to (row offset, column offset).
DIFFUSION = ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16))


def quantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round(x * (levels - 1)) / (levels - 1)


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Dithered quantisation of (N, C, H, W) in [0, 1], pixel by pixel in raster order; each step is
    vectorised over the batch and channels, so a whole batch costs H·W small kernels."""
    height, width = x.shape[-2:]
    work = x.clone()
    for i in range(height):
        for j in range(width):
            old = work[..., i, j].clone()  # a copy: the slot is overwritten next
            new = quantize(old.clamp(0, 1), levels)
            work[..., i, j] = new
            error = old - new
            for di, dj, share in DIFFUSION:
                if i + di < height and 0 <= j + dj < width:
                    work[..., i + di, j + dj] += share * error
    return work


@ATTACKS.register("bpp")
class Bpp(ImageAttack):
    trigger_defaults = {"levels": 8, "dither": True}  # 8 levels per channel = 3 bits

    def check_trigger(self) -> None:
        self.require(2 <= int(self.levels) <= 255, "levels", "must be in [2, 255]")

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        levels = int(self.levels)
        return floyd_steinberg(x, levels) if self.dither else quantize(x, levels)
