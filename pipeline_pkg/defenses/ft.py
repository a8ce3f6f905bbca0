"""`ft`: vanilla fine-tuning of all weights on the clean budget."""

from __future__ import annotations

import torch.nn.functional as F

from ..models import count_parameters
from ..optim import SGD, CosineAnnealingLR
from ..registry import DEFENSES
from ..runtime import autocast
from ..trainer import guarded_step
from .base import Defense


@DEFENSES.register("ft")
class FineTuning(Defense):
    # max_grad_norm: clip the gradient norm (null: no clipping). A model trained with Adam (PointNet's
    # recipe) can sit where plain SGD steps of this size blow up; clipping keeps them bounded.
    method_defaults = {"steps": 300, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
                       "max_grad_norm": None}

    def check_method(self) -> None:
        self.positive("steps", "lr", "batch_size")
        self.non_negative("momentum", "weight_decay")
        self.positive_or_none("max_grad_norm")

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        self.train_mode(model)
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        self.tunable_parameters = count_parameters(model)
        optimizer = SGD(params, lr=float(self.lr), momentum=float(self.momentum),
                        weight_decay=float(self.weight_decay))
        scheduler = CosineAnnealingLR(optimizer, int(self.steps))
        batches = self.batches(x, y, seed)
        for step in range(int(self.steps)):
            xb, yb = next(batches)
            with autocast(x.device):
                loss = F.cross_entropy(model(xb), yb)
            guarded_step(optimizer, loss, f"ft step {step}", max_grad_norm=self.max_grad_norm)
            scheduler.step()
            if step % int(self.log_every) == 0:
                log({"loss": loss.item()}, step)
        return self.finish(model)
