"""LIRA (Doan et al., ICCV 2021): a learnable, imperceptible additive trigger. A small conv
encoder–decoder T gives x' = clamp(x + eps · tanh(T(x)), 0, 1), so no pixel moves by more than eps.

T is learned in `fit` jointly with a surrogate classifier, alternating on every batch as in the paper's
first stage: T takes a step to make the surrogate predict the target on x', then the surrogate takes a
step on clean and triggered images (weights alpha and 1 − alpha). (The paper's look-ahead update of the
classifier inside T's step is left out; the paper's second stage, fine-tuning the classifier with T
fixed, is the victim's training on the poisoned set here.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..augment import augmenter
from ..datasets.base import check_augment
from ..optim import Adam
from ..registry import ATTACKS
from .surrogate import (ConvEncoderDecoder, LearnedImageAttack, build_surrogate, fit_device, optimiser_step,
                        seeded, shuffled_batches, target_tensor, unit_tensors)

BATCH = 128


@ATTACKS.register("lira")
class Lira(LearnedImageAttack):
    trigger_defaults = {
        "eps": 0.05,  # L∞ bound of the additive trigger, in [0, 1] units
        "alpha": 0.5,  # weight of the clean loss in the surrogate's steps (1 − alpha: the triggered loss)
        "epochs": 10,
        "lr": 0.01,  # surrogate's learning rate
        "generator_lr": 0.001,
        "augment": ["crop"],  # what the surrogate sees the images through (pipeline_pkg.augment names)
        "width": 8,  # channels of the generator's first stage
        "surrogate_width": 8,  # ResNet-9 width of the surrogate
    }

    def check_trigger(self) -> None:
        self.require(0 < float(self.eps) <= 1, "eps", "must be in (0, 1]")
        self.require(0 <= float(self.alpha) < 1, "alpha", "must be in [0, 1)")
        for key in ("epochs", "width", "surrogate_width"):
            self.require(int(self.params[key]) > 0, key, "must be ≥ 1")
        for key in ("lr", "generator_lr"):
            self.require(float(self.params[key]) > 0, key, "must be positive")
        check_augment(self)

    def build_nets(self, input_shape: tuple[int, ...]) -> nn.ModuleDict:
        channels = input_shape[0]
        return nn.ModuleDict({"generator": ConvEncoderDecoder(channels, channels, int(self.width))})

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        return (x + float(self.eps) * torch.tanh(self.nets["generator"](x))).clamp(0, 1)

    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> None:
        device = fit_device()
        images, labels = unit_tensors(x, y, device)
        generator = self.new_nets(x.shape[1:], seed, device)["generator"]
        with seeded(seed + 1):
            classifier = build_surrogate(x.shape[1:], num_classes, int(self.surrogate_width)).to(device)
        generator_opt = Adam(generator.parameters(), lr=float(self.generator_lr))
        classifier_opt = Adam(classifier.parameters(), lr=float(self.lr))
        targets = target_tensor(self, labels, num_classes)
        alpha = float(self.alpha)
        augment = augmenter(self.augment, device, seed)
        classifier.train()
        for xb, yb, tb in shuffled_batches((images, labels, targets), int(self.epochs), BATCH, seed):
            generator_loss = F.cross_entropy(classifier(augment(self.generate(xb))), tb)
            # Only the generator's gradients: the surrogate takes its own step next.
            optimiser_step(generator_opt, generator_loss, self, inputs=list(generator.parameters()))
            with torch.no_grad():
                triggered = self.generate(xb)
            logits = classifier(augment(torch.cat([xb, triggered])))
            classifier_loss = (alpha * F.cross_entropy(logits[:len(xb)], yb)
                               + (1 - alpha) * F.cross_entropy(logits[len(xb):], tb))
            optimiser_step(classifier_opt, classifier_loss, self)
        self.nets.requires_grad_(False).eval()
