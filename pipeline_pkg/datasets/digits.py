"""scikit-learn's 8×8 handwritten digits: real images that ship with a package, so the offline default
config and the tests have an image dataset without any download. Upscaled (bilinear) to `size` pixels,
stored like every image dataset as uint8 (N, C, H, W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import DATASETS
from .base import Dataset, DatasetArrays, check_augment


@DATASETS.register("digits")
class Digits(Dataset):
    modality = "image"
    generated = False
    files = []  # ships inside scikit-learn
    defaults = {
        "size": 16,  # side of the upscaled square image
        "test_fraction": 0.25,  # stratified split, drawn from data_seed
        "augment": ["crop"],  # no flip: a mirrored digit is another symbol
    }

    def check(self) -> None:
        self.require(int(self.size) >= 8, "size", "must be at least 8 (the original resolution)")
        self.require(0 < float(self.test_fraction) < 1, "test_fraction", "must be in (0, 1)")
        check_augment(self)

    def build(self, raw_dir: Path, seed: int) -> DatasetArrays:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # values 0..16
        size = int(self.size)
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        y = digits.target.astype(np.int64)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=float(self.test_fraction), stratify=y, random_state=seed)
        return DatasetArrays(x_train, y_train, x_test, y_test, [str(c) for c in range(10)])
