"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): every image gets its own trigger. A
pattern generator G and a mask generator M, both small conv encoder–decoders, give the triggered image
x' = x + M(x) · (G(x) − x).

Training, in `fit`, follows the paper's two stages. First M alone: its masks are pushed below a target
density and made diverse (different images, different masks). Then G jointly with a surrogate
classifier, on batches that hold backdoor samples (own trigger → target), cross-trigger samples (the
trigger generated for another image → true label, so a trigger works only on its own image) and clean
samples, plus the diversity loss ‖x − x'‖ / ‖G(x) − G(x')‖ that keeps G from collapsing to one pattern.
The victim cannot be trained by the attacker here, so `poison` also adds cross-trigger samples to the
training set (`cross_ratio` per poisoned sample, labels kept), as the paper's training batches do.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..optim import Adam
from ..registry import ATTACKS
from .image_base import to_uint8, to_unit
from .surrogate import (ConvEncoderDecoder, LearnedImageAttack, build_surrogate, fit_device, in_batches,
                        optimiser_step, pairwise_diversity, seeded, shuffled_batches, target_tensor,
                        unit_tensors)

BATCH = 128
MASK_SHARPNESS = 20.0  # slope of the soft threshold that makes masks nearly binary


def soft_threshold(mask: torch.Tensor) -> torch.Tensor:
    """Pushes mask values in [0, 1] towards 0 or 1 around 0.5, differentiably."""
    return (torch.tanh(MASK_SHARPNESS * (mask - 0.5)) + 1) / 2


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return x + mask * (pattern - x)


@ATTACKS.register("inputaware")
class InputAware(LearnedImageAttack):
    trigger_defaults = {
        "mask_density": 0.032,  # share of the pixels a mask may cover (the paper's value)
        "lambda_div": 1.0,  # weight of the diversity losses
        "lambda_norm": 100.0,  # weight of the mask-density penalty
        "train_rate": 0.1,  # share of each surrogate batch with a backdoor trigger (ρ_b)
        "cross_ratio": 1.0,  # cross-trigger samples per backdoor sample, in training and in poison
        "mask_epochs": 5,
        "epochs": 10,  # joint epochs of pattern generator and surrogate
        "lr": 0.01,  # surrogate's learning rate
        "generator_lr": 0.001,
        "width": 8,  # channels of the generators' first stage
        "surrogate_width": 8,  # ResNet-9 width of the surrogate
    }

    def check_trigger(self) -> None:
        self.require(0 < float(self.mask_density) <= 1, "mask_density", "must be in (0, 1]")
        self.require(float(self.lambda_div) >= 0, "lambda_div", "must be ≥ 0")
        self.require(float(self.lambda_norm) >= 0, "lambda_norm", "must be ≥ 0")
        self.require(0 < float(self.train_rate) < 1, "train_rate", "must be in (0, 1)")
        self.require(float(self.cross_ratio) >= 0, "cross_ratio", "must be ≥ 0")
        self.require(float(self.train_rate) * (1 + float(self.cross_ratio)) <= 1, "cross_ratio",
                     "leaves no room in a batch: train_rate · (1 + cross_ratio) must be ≤ 1")
        for key in ("mask_epochs", "epochs", "width", "surrogate_width"):
            self.require(int(self.params[key]) > 0, key, "must be ≥ 1")
        for key in ("lr", "generator_lr"):
            self.require(float(self.params[key]) > 0, key, "must be positive")

    def build_nets(self, input_shape: tuple[int, ...]) -> nn.ModuleDict:
        channels, width = input_shape[0], int(self.width)
        return nn.ModuleDict({"pattern": ConvEncoderDecoder(channels, channels, width),
                              "mask": ConvEncoderDecoder(channels, 1, width)})

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.nets["pattern"](x)) + 1) / 2

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return soft_threshold(torch.sigmoid(self.nets["mask"](x)))

    def blend(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """x with the trigger generated from `source` (source = x: the backdoor; another image: cross)."""
        return stamp(x, self.mask(source), self.pattern(source))

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        return self.blend(x, x)

    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> None:
        device = fit_device()
        images, labels = unit_tensors(x, y, device)
        nets = self.new_nets(x.shape[1:], seed, device)
        self.fit_mask(images, seed)
        nets["mask"].requires_grad_(False)
        with seeded(seed + 1):
            classifier = build_surrogate(x.shape[1:], num_classes, int(self.surrogate_width)).to(device)
        optimizer = Adam([
            {"params": classifier.parameters(), "lr": float(self.lr)},
            {"params": nets["pattern"].parameters(), "lr": float(self.generator_lr)},
        ])
        n_backdoor = round(float(self.train_rate) * BATCH)
        backdoor = slice(0, n_backdoor)
        cross = slice(n_backdoor, n_backdoor + round(float(self.cross_ratio) * n_backdoor))
        targets = target_tensor(self, labels, num_classes)
        classifier.train()
        for xb, yb, tb in shuffled_batches((images, labels, targets), int(self.epochs), BATCH, seed):
            with torch.no_grad():
                mask = self.mask(xb)
            pattern = self.pattern(xb)
            # Each image's neighbour in the batch supplies its cross trigger and its diversity partner.
            mask_other, pattern_other = mask.roll(1, dims=0), pattern.roll(1, dims=0)
            inputs = torch.cat([stamp(xb[backdoor], mask[backdoor], pattern[backdoor]),
                                stamp(xb[cross], mask_other[cross], pattern_other[cross]),
                                xb[cross.stop:]])
            wanted = torch.cat([tb[backdoor], yb[backdoor.stop:]])
            diversity = pairwise_diversity(xb, xb.roll(1, dims=0), pattern, pattern_other)
            loss = F.cross_entropy(classifier(inputs), wanted) + float(self.lambda_div) * diversity
            optimiser_step(optimizer, loss, self)
        self.nets.requires_grad_(False).eval()

    def fit_mask(self, images: torch.Tensor, seed: int) -> None:
        """Stage one: masks no denser than `mask_density`, and different for different images."""
        mask_net = self.nets["mask"]
        optimizer = Adam(mask_net.parameters(), lr=float(self.generator_lr))
        for (xb,) in shuffled_batches((images,), int(self.mask_epochs), BATCH, seed + 2):
            mask = self.mask(xb)
            density = F.relu(mask.mean() - float(self.mask_density))
            diversity = pairwise_diversity(xb, xb.roll(1, dims=0), mask, mask.roll(1, dims=0))
            loss = float(self.lambda_norm) * density + float(self.lambda_div) * diversity
            optimiser_step(optimizer, loss, self)

    def poison(self, x: np.ndarray, y: np.ndarray, num_classes: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x_poisoned, y_poisoned, idx = super().poison(x, y, num_classes, rng)
        rest = np.setdiff1d(np.arange(len(y)), idx)
        n_cross = min(len(rest), int(round(float(self.cross_ratio) * len(idx))))
        if n_cross:
            cross = np.sort(rng.choice(rest, size=n_cross, replace=False))
            sources = rng.choice(np.setdiff1d(np.arange(len(y)), cross), size=n_cross)
            device = fit_device()
            self.fitted_nets(device)
            channels = x.shape[1]
            # Image and trigger source side by side in the channels, so one batched pass blends both.
            pairs = to_unit(torch.from_numpy(np.concatenate([x[cross], x[sources]], axis=1)).to(device))
            blended = in_batches(lambda pair: self.blend(pair[:, :channels], pair[:, channels:]), pairs)
            x_poisoned[cross] = to_uint8(blended).cpu().numpy()
        return x_poisoned, y_poisoned, idx
