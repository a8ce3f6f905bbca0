"""FTrojan (Wang et al., ECCV 2022): the trigger lives in the frequency domain. Colour images go to
YUV and the chrominance channels (U, V) get a fixed bump at a mid and a high frequency of their
orthonormal 2-D DCT; grey images get it in their one channel. Invisible, but the same every time."""

from __future__ import annotations

import math

import torch

from ..registry import ATTACKS
from .image_base import ImageAttack

# BT.601 RGB → YUV.
RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114],
                           [-0.14713, -0.28886, 0.436],
                           [0.615, -0.51499, -0.10001]])


def dct_matrix(n: int, device: torch.device) -> torch.Tensor:
    """Orthonormal DCT-II matrix D: the 2-D DCT of X is D X Dᵀ and its inverse Dᵀ Y D."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=torch.float32)


def color_transform(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("dc,nchw->ndhw", matrix.to(x.device), x)


@ATTACKS.register("ftrojan")
class FTrojan(ImageAttack):
    trigger_defaults = {
        "magnitude": 30.0,  # added to each chosen DCT coefficient, in 0..255 units
        # [row, column] frequencies; null: a mid one (H/2 − 1, W/2 − 1) and the highest (H − 1, W − 1)
        "frequencies": None,
    }

    def check_trigger(self) -> None:
        self.require(float(self.magnitude) > 0, "magnitude", "must be positive")
        freqs = self.frequencies
        self.require(freqs is None or (isinstance(freqs, list) and all(len(f) == 2 for f in freqs)),
                     "frequencies", "must be null or a list of [row, column] pairs")

    def positions(self, height: int, width: int) -> list[tuple[int, int]]:
        freqs = self.frequencies or [[height // 2 - 1, width // 2 - 1], [height - 1, width - 1]]
        for row, col in freqs:
            if not (0 <= row < height and 0 <= col < width):
                raise ValueError(f"attack 'ftrojan': frequency {[row, col]} is outside a {height}×{width} image")
        return [(int(r), int(c)) for r, c in freqs]

    def bump(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The spatial pattern whose DCT is `magnitude`/255 at the chosen frequencies and 0 elsewhere."""
        spectrum = torch.zeros(height, width, device=device)
        for row, col in self.positions(height, width):
            spectrum[row, col] = float(self.magnitude) / 255.0
        return dct_matrix(height, device).T @ spectrum @ dct_matrix(width, device)

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        bump = self.bump(x.shape[-2], x.shape[-1], x.device)
        if x.shape[1] == 1:
            return x + bump
        if x.shape[1] != 3:
            raise ValueError(f"attack 'ftrojan': images need 1 or 3 channels, got {x.shape[1]}")
        yuv = color_transform(x, RGB_TO_YUV)
        yuv[:, 1:] += bump  # chrominance only: the luminance the eye is sensitive to is untouched
        return color_transform(yuv, torch.linalg.inv(RGB_TO_YUV))
