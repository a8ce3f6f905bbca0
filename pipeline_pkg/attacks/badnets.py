"""BadNets (Gu et al., 2017): a small fixed patch stamped into one corner of the image."""

from __future__ import annotations

import torch

from ..registry import ATTACKS
from .image_base import ImageAttack

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


def checkerboard(size: int) -> torch.Tensor:
    """1 where row + column is even (the corners are white), else 0."""
    idx = torch.arange(size)
    return ((idx[:, None] + idx[None, :]) % 2 == 0).float()


@ATTACKS.register("badnets")
class BadNets(ImageAttack):
    trigger_defaults = {
        "size": 3,  # side of the square patch, in pixels
        "corner": "bottom_right",
        "margin": 1,  # pixels between the patch and the image border
        "pattern": "checkerboard",  # or "white": a solid square
    }

    def check_trigger(self) -> None:
        self.require(int(self.size) > 0, "size", "must be a positive number of pixels")
        self.require(int(self.margin) >= 0, "margin", "must be ≥ 0")
        self.require(self.corner in CORNERS, "corner", f"must be one of {list(CORNERS)}")
        self.require(self.pattern in ("checkerboard", "white"), "pattern", "must be 'checkerboard' or 'white'")

    def patch_box(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns the patch covers in an image of this size."""
        size, margin = int(self.size), int(self.margin)
        if size + margin > min(height, width):
            raise ValueError(f"attack {self.name!r}: a {size}-pixel patch with margin {margin} does not fit "
                             f"a {height}×{width} image; lower size or margin")
        top = height - margin - size if self.corner.startswith("bottom") else margin
        left = width - margin - size if self.corner.endswith("right") else margin
        return slice(top, top + size), slice(left, left + size)

    def patch(self) -> torch.Tensor:
        size = int(self.size)
        return checkerboard(size) if self.pattern == "checkerboard" else torch.ones(size, size)

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.patch_box(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., rows, cols] = self.patch().to(x.device)
        return out
