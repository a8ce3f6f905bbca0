"""TrojanNN (Liu et al., NDSS 2018): a patch trigger whose pixels are not chosen but optimised, so that
they drive selected internal neurons of a model trained on the task to a high value; the optimised
patch is then stamped like a BadNets patch.

The neurons are those of the penultimate `features` layer most strongly connected to their neighbouring
layer, as in the paper; here the connection is the summed absolute weight into `classifier`, the one
weight matrix every architecture of the pipeline shares (the features' incoming weights differ per
architecture: residual sums, batch norms). The model is a surrogate trained on the clean data to poison.
The paper's last step, retraining the model on reverse-engineered data, is the victim's training here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..optim import Adam
from ..registry import ATTACKS
from .badnets import CORNERS, BadNets
from .surrogate import LearnedImageAttack, fit_device, optimiser_step, train_surrogate, unit_tensors

OPTIMISE_BATCH = 64  # images the patch is stamped on at each optimisation step


class TrojanPatch(nn.Module):
    """The learned patch's pixel values in [0, 1], one square per channel."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.pattern = nn.Parameter(torch.rand(channels, size, size))


@ATTACKS.register("trojan")
class Trojan(LearnedImageAttack, BadNets):
    trigger_defaults = {
        "size": 4,  # side of the square patch (the mask), in pixels
        "corner": "bottom_right",
        "margin": 1,  # pixels between the patch and the image border
        "neurons": 1,  # how many penultimate neurons the patch is optimised to excite
        "target_activation": 10.0,  # value the selected neurons are driven to
        "steps": 200,  # optimisation steps (Adam) on the patch pixels
        "lr": 0.1,
        "surrogate_epochs": 3,
        "surrogate_width": 8,  # ResNet-9 width of the surrogate
    }

    def check_trigger(self) -> None:
        self.require(int(self.size) > 0, "size", "must be a positive number of pixels")
        self.require(int(self.margin) >= 0, "margin", "must be ≥ 0")
        self.require(self.corner in CORNERS, "corner", f"must be one of {list(CORNERS)}")
        self.require(int(self.neurons) > 0, "neurons", "must be ≥ 1")
        self.require(float(self.target_activation) > 0, "target_activation", "must be positive")
        self.require(int(self.steps) > 0, "steps", "must be ≥ 1")
        self.require(float(self.lr) > 0, "lr", "must be positive")
        self.require(int(self.surrogate_epochs) > 0, "surrogate_epochs", "must be ≥ 1")
        self.require(int(self.surrogate_width) > 0, "surrogate_width", "must be ≥ 1")

    def build_nets(self, input_shape: tuple[int, ...]) -> nn.ModuleDict:
        return nn.ModuleDict({"patch": TrojanPatch(input_shape[0], int(self.size))})

    def patch(self) -> torch.Tensor:
        return self.fitted_nets()["patch"].pattern

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        return BadNets.trigger_float(self, x)  # the stamp, with the learned patch

    def selected_neurons(self, classifier: nn.Linear) -> torch.Tensor:
        return classifier.weight.abs().sum(0).topk(int(self.neurons)).indices

    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> None:
        surrogate = train_surrogate(x, y, num_classes, seed, int(self.surrogate_epochs),
                                    int(self.surrogate_width))
        device = fit_device()
        images, _ = unit_tensors(x, y, device)
        neurons = self.selected_neurons(surrogate.classifier)
        pattern = self.new_nets(x.shape[1:], seed, device)["patch"].pattern
        optimizer = Adam([pattern], lr=float(self.lr))
        picker = torch.Generator().manual_seed(int(seed))
        for _ in range(int(self.steps)):
            batch = images[torch.randint(len(images), (OPTIMISE_BATCH,), generator=picker).to(device)]
            activation = surrogate.features(self.generate(batch))[:, neurons]
            loss = (activation - float(self.target_activation)).pow(2).mean()
            optimiser_step(optimizer, loss, self)
            with torch.no_grad():
                pattern.clamp_(0.0, 1.0)
        self.nets.requires_grad_(False)
