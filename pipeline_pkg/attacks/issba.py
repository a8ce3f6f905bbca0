"""ISSBA (Li et al., ICCV 2021): a sample-specific invisible additive trigger. A StegaStamp-style
encoder hides a fixed bit string in each image as a small residual that depends on the image; the
residual for the attack's code is the trigger: x' = clamp(x + r(x, code), 0, 1), |r| ≤ max_residual.

In `fit` the encoder is trained with a decoder, as a steganography pair, on the images to poison: each
batch gets random bit strings (with one fixed string the decoder could answer without looking), the
decoder must read them back from the encoded images, optionally seen through augmentations (`augment`,
standing in for the paper's distortion layers; off by default, since through random crops a small
decoder does not learn to read 16×16 images within a short fit), and an L2 penalty keeps the residual
small (the paper's perceptual loss is left out). Only the encoder is kept: it alone makes the trigger.
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
from .surrogate import (ConvEncoderDecoder, LearnedImageAttack, conv_relu, fit_device, optimiser_step, seeded,
                        shuffled_batches, unit_tensors)

BATCH = 128


class StegaEncoder(nn.Module):
    """(image, bits) → raw residual: the bits become one extra image plane, which a conv encoder–decoder
    reads together with the image."""

    def __init__(self, input_shape: tuple[int, ...], bits: int, width: int):
        super().__init__()
        channels, self.rows, self.cols = input_shape
        self.code_plane = nn.Linear(bits, self.rows * self.cols)
        self.net = ConvEncoderDecoder(channels + 1, channels, width)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        plane = self.code_plane(code).view(len(code), 1, self.rows, self.cols)
        return self.net(torch.cat([x, plane], dim=1))


def quarter(n: int) -> int:
    return ((n + 1) // 2 + 1) // 2


class StegaDecoder(nn.Module):
    """Encoded image → one logit per bit. Strided convs and a dense read-out over all positions (as in
    StegaStamp): the bits are spread over the image, so no global pooling."""

    def __init__(self, input_shape: tuple[int, ...], bits: int, width: int):
        super().__init__()
        channels, rows, cols = input_shape
        w = int(width)
        self.convs = nn.Sequential(conv_relu(channels, w, stride=2), conv_relu(w, 2 * w, stride=2),
                                   nn.Flatten())
        # Each stride-2 conv (kernel 3, padding 1) maps n positions to ceil(n / 2).
        self.readout = nn.Linear(2 * w * quarter(rows) * quarter(cols), bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.convs(x))


@ATTACKS.register("issba")
class ISSBA(LearnedImageAttack):
    trigger_defaults = {
        "bits": 16,  # length of the hidden bit string
        "code_seed": 0,  # draws the attack's bit string
        "max_residual": 0.03,  # L∞ bound of the residual, in [0, 1] units
        "residual_weight": 0.01,  # weight of the mean squared (residual / max_residual)
        "epochs": 10,
        "lr": 0.01,
        "augment": [],  # what the decoder sees the encoded images through (pipeline_pkg.augment names)
        "width": 8,  # channels of the encoder's first stage
        "decoder_width": 8,  # channels of the decoder's first conv
    }

    def check_trigger(self) -> None:
        self.require(int(self.bits) > 0, "bits", "must be ≥ 1")
        self.require(0 < float(self.max_residual) <= 1, "max_residual", "must be in (0, 1]")
        self.require(float(self.residual_weight) >= 0, "residual_weight", "must be ≥ 0")
        for key in ("epochs", "width", "decoder_width"):
            self.require(int(self.params[key]) > 0, key, "must be ≥ 1")
        self.require(float(self.lr) > 0, "lr", "must be positive")
        check_augment(self)

    def build_nets(self, input_shape: tuple[int, ...]) -> nn.ModuleDict:
        return nn.ModuleDict({"encoder": StegaEncoder(input_shape, int(self.bits), int(self.width))})

    def code(self, device: torch.device) -> torch.Tensor:
        """The attack's bit string as floats 0/1, fixed by `code_seed`."""
        gen = torch.Generator().manual_seed(int(self.code_seed))
        return torch.randint(0, 2, (int(self.bits),), generator=gen).float().to(device)

    def residual(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return float(self.max_residual) * torch.tanh(self.nets["encoder"](x, code))

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        code = self.code(x.device).expand(len(x), -1)
        return (x + self.residual(x, code)).clamp(0, 1)

    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> None:
        device = fit_device()
        images, _ = unit_tensors(x, y, device)
        encoder = self.new_nets(x.shape[1:], seed, device)["encoder"]
        with seeded(seed + 1):
            decoder = StegaDecoder(x.shape[1:], int(self.bits), int(self.decoder_width)).to(device)
        optimizer = Adam([*encoder.parameters(), *decoder.parameters()], lr=float(self.lr))
        augment = augmenter(self.augment, device, seed)
        codes = torch.Generator(device=device).manual_seed(int(seed))
        for (xb,) in shuffled_batches((images,), int(self.epochs), BATCH, seed):
            code = torch.randint(0, 2, (len(xb), int(self.bits)), generator=codes, device=device).float()
            residual = self.residual(xb, code)
            decoded = decoder(augment((xb + residual).clamp(0, 1)))
            # The image loss counts only as far as the decoder already reads the bits (StegaStamp ramps it
            # up for the same reason): under Adam even a tiny penalty would otherwise wipe out the residual
            # before the decoder has learned to read it, and the pair would never learn.
            bit_accuracy = ((decoded.detach() > 0).float() == code).float().mean()
            readable = ((bit_accuracy - 0.6) / 0.3).clamp(0, 1)
            image_loss = (residual / float(self.max_residual)).pow(2).mean()
            loss = (F.binary_cross_entropy_with_logits(decoded, code)
                    + float(self.residual_weight) * readable * image_loss)
            optimiser_step(optimizer, loss, self)
        self.nets.requires_grad_(False).eval()
