"""Label-consistent backdoor (Turner, Tsipras & Madry, 2019): clean label. The poisoned target-class
images are first made hard to classify by their content, with an L∞ PGD adversarial perturbation
against a surrogate model, so that the model must lean on the trigger to fit them; then a small
checkerboard is stamped into each of the four corners. At test time the four-corner pattern alone is
the trigger. (The paper's perturbations come from an adversarially trained model or a GAN; here the
surrogate is a ResNet-9 trained on the clean images plus copies with Gaussian noise, a cheap stand-in
for adversarial training: without it the perturbations hardly transfer to the victim.)"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import ATTACKS
from .badnets import checkerboard
from .image_base import ImageAttack, to_uint8, to_unit
from .surrogate import fit_device, train_surrogate

PGD_BATCH = 512
NOISY_COPIES = 2


@ATTACKS.register("lc")
class LabelConsistent(ImageAttack):
    clean_label = True
    # As for SIG: only target-class samples are eligible, at most 10% of a balanced 10-class training
    # set, so the default poisons about half of the target class.
    poison_defaults = {"rate": 0.05, "target": 0, "mode": "all_to_one"}
    trigger_defaults = {
        "eps": 8 / 255,  # L∞ bound of the adversarial perturbation, in [0, 1] units
        "steps": 10,  # PGD steps, each of 2.5 · eps / steps (Madry et al.)
        "size": 3,  # side of the checkerboard in each corner, in pixels
        "margin": 0,  # pixels between each checkerboard and the image border
        # 1: the corners show the pattern; less blends it into the image (the paper's fainter variants)
        "amplitude": 1.0,
        "surrogate_noise": 0.25,  # std of the noisy copies the surrogate also sees ([0, 1] units); 0: none
        "surrogate_epochs": 3,
        "surrogate_width": 8,  # ResNet-9 width of the surrogate
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.surrogate: torch.nn.Module | None = None

    def check_trigger(self) -> None:
        self.require(0 <= float(self.eps) < 1, "eps", "must be in [0, 1)")
        self.require(int(self.steps) >= 0, "steps", "must be ≥ 0")
        self.require(int(self.size) > 0, "size", "must be a positive number of pixels")
        self.require(int(self.margin) >= 0, "margin", "must be ≥ 0")
        self.require(0 < float(self.amplitude) <= 1, "amplitude", "must be in (0, 1]")
        self.require(float(self.surrogate_noise) >= 0, "surrogate_noise", "must be ≥ 0")
        self.require(int(self.surrogate_epochs) > 0, "surrogate_epochs", "must be ≥ 1")
        self.require(int(self.surrogate_width) > 0, "surrogate_width", "must be ≥ 1")
        self.require(self.mode == "all_to_one", "mode",
                     "must be all_to_one: a clean-label attack has one target")

    def corner_boxes(self, height: int, width: int) -> list[tuple[slice, slice]]:
        size, margin = int(self.size), int(self.margin)
        if 2 * (size + margin) > min(height, width):
            raise ValueError(f"attack 'lc': four {size}-pixel corner patterns with margin {margin} do not "
                             f"fit a {height}×{width} image; lower size or margin")
        rows = (slice(margin, margin + size), slice(height - margin - size, height - margin))
        cols = (slice(margin, margin + size), slice(width - margin - size, width - margin))
        return [(r, c) for r in rows for c in cols]

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        pattern, amplitude = checkerboard(int(self.size)).to(x.device), float(self.amplitude)
        out = x.clone()
        for rows, cols in self.corner_boxes(x.shape[-2], x.shape[-1]):
            out[..., rows, cols] = (1 - amplitude) * x[..., rows, cols] + amplitude * pattern
        return out

    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> None:
        sigma = float(self.surrogate_noise)
        if sigma > 0:
            rng = np.random.default_rng(seed)
            noisy = [np.clip(x + 255 * sigma * rng.standard_normal(x.shape, dtype=np.float32), 0, 255)
                     .round().astype(np.uint8) for _ in range(NOISY_COPIES)]
            x, y = np.concatenate([x, *noisy]), np.concatenate([y] * (NOISY_COPIES + 1))
        self.surrogate = train_surrogate(x, y, num_classes, seed, int(self.surrogate_epochs),
                                         int(self.surrogate_width))

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Untargeted L∞ PGD from the image itself (no random start, so deterministic): floats in [0, 1]."""
        eps, steps = float(self.eps), int(self.steps)
        step_size = 2.5 * eps / max(1, steps)
        adv = x.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(self.surrogate(adv), y)
            grad, = torch.autograd.grad(loss, adv)
            adv = (adv.detach() + step_size * grad.sign()).clamp(x - eps, x + eps).clamp(0, 1)
        return adv.detach()

    def hard_images(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The uint8 images with their adversarial perturbation (before the corner trigger)."""
        if self.surrogate is None:
            raise RuntimeError("attack 'lc': the adversarial perturbation needs the surrogate model; "
                               "call fit() first (the poison stage does)")
        device = fit_device()
        self.surrogate.to(device)
        out = [to_uint8(self.perturb(to_unit(torch.from_numpy(x[i:i + PGD_BATCH]).to(device)),
                                     torch.from_numpy(y[i:i + PGD_BATCH]).to(device))).cpu().numpy()
               for i in range(0, len(x), PGD_BATCH)]
        return np.concatenate(out) if out else x.copy()

    def poison(self, x: np.ndarray, y: np.ndarray, num_classes: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # The base picks the samples and keeps their labels; their images are redone from the
        # perturbed originals, since the perturbation depends on each image.
        x_poisoned, y_poisoned, idx = super().poison(x, y, num_classes, rng)
        if len(idx):
            x_poisoned[idx] = self.trigger_numpy(self.hard_images(x[idx], y[idx]))
        return x_poisoned, y_poisoned, idx
