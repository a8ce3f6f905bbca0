"""`ftsam`: fine-tuning with Sharpness-Aware Minimization (Zhu et al., ICCV 2023).

Each step first moves the weights to the worst point of a small neighbourhood (ascent along the
gradient, radius `rho`; with `adaptive`, scaled per weight by |θ| as in ASAM), takes the gradient there
and applies it at the original weights. The perturbation can wake a trigger path that clean data leaves
dormant, so clean-data training can then suppress it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..optim import SGD, CosineAnnealingLR
from ..registry import DEFENSES
from ..runtime import autocast
from ..trainer import check_finite
from .base import Defense


@DEFENSES.register("ftsam")
class FineTuningSAM(Defense):
    # Plain SAM with a small radius by default: on the RF models, ASAM with the paper-scale radius
    # (ρ ≥ 0.5) collapsed or diverged (README, benchmarks/purify_sweep.py).
    method_defaults = {"steps": 300, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
                       "rho": 0.05, "adaptive": False, "max_grad_norm": None}

    def check_method(self) -> None:
        self.positive("steps", "lr", "batch_size", "rho")
        self.non_negative("momentum", "weight_decay")
        self.require(isinstance(self.adaptive, bool), "adaptive", "must be true or false")
        self.positive_or_none("max_grad_norm")

    def loss(self, model, xb, yb, where: str) -> torch.Tensor:
        with autocast(xb.device):
            loss = F.cross_entropy(model(xb), yb)
        check_finite(loss, where)
        return loss

    @torch.no_grad()
    def ascent(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The perturbation e = ρ·T²g/‖Tg‖ (T = |θ| when adaptive, else 1), applied in place."""
        scaled = [(p.abs() if self.adaptive else torch.ones_like(p)) * p.grad for p in params]
        norm = torch.sqrt(sum((s ** 2).sum() for s in scaled)) + 1e-12
        steps = [float(self.rho) * (p.abs() if self.adaptive else 1.0) * s / norm for p, s in zip(params, scaled)]
        for p, e in zip(params, steps):
            p.add_(e)
        return steps

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        self.tunable_parameters = sum(p.numel() for p in params)
        optimizer = SGD(params, lr=float(self.lr), momentum=float(self.momentum),
                        weight_decay=float(self.weight_decay))
        scheduler = CosineAnnealingLR(optimizer, int(self.steps))
        batches = self.batches(x, y, seed)
        self.train_mode(model)
        for step in range(int(self.steps)):
            xb, yb = next(batches)
            optimizer.zero_grad(set_to_none=True)
            clean_loss = self.loss(model, xb, yb, f"ftsam step {step}")
            clean_loss.backward()
            perturbation = self.ascent(params)
            optimizer.zero_grad(set_to_none=True)
            sharp_loss = self.loss(model, xb, yb, f"ftsam step {step} (perturbed)")
            sharp_loss.backward()
            with torch.no_grad():
                for p, e in zip(params, perturbation):
                    p.sub_(e)
            if self.max_grad_norm is not None:  # the perturbed point's gradient, as ft clips its own
                torch.nn.utils.clip_grad_norm_(params, float(self.max_grad_norm))
            optimizer.step()
            scheduler.step()
            if step % int(self.log_every) == 0:
                log({"loss": clean_loss.item(), "perturbed_loss": sharp_loss.item()}, step)
        return self.finish(model)
