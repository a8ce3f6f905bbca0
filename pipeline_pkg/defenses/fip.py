"""`fip`: Fisher Information guided Purification (CCS 2024).

A backdoored model sits in a sharp minimum; FIP re-optimises all weights on the clean budget towards a
smooth one: loss = CE + η_F·Tr(F(θ)) + η_r·Σ_j F_j(θ₀)(θ_j − θ₀,j)². Tr(F) is estimated every few steps
(it costs a double backward); the diagonal Fisher F(θ₀) of the backdoored weights is computed once.

Tr(F) grows with the number of weights: on the 62k-weight RF CNN, η_F·‖∇Tr(F)‖ is ~10⁴ times ‖∇CE‖
(benchmarks/fip_gradient_scale.py), so every trace step is clipped to max_grad_norm along ∇Tr(F) alone
and η_F only switches the term on. `trace_per_parameter: true` uses Tr(F)/(number of tuned values), the
mean Fisher eigenvalue, which η_F then weighs against CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..optim import SGD, CosineAnnealingLR, LambdaLR
from ..registry import DEFENSES
from ..runtime import autocast
from ..trainer import guarded_step
from .base import Defense
from .fisher import diagonal_fisher, fisher_trace_estimate, retention_penalty

# The paper's code keeps the learning rate constant; "cosine" anneals it to 0 over `steps`, as `ft` does,
# so that the last steps settle instead of leaving the weights wherever a large step put them.
LR_SCHEDULES = {"constant": lambda optimizer, steps: LambdaLR(optimizer, lambda t: 1.0),
                "cosine": CosineAnnealingLR}


@DEFENSES.register("fip")
class FisherInformationPurification(Defense):
    method_defaults = {"steps": 2000, "lr": 0.005, "momentum": 0.95, "batch_size": 128,
                       "eta_f": 0.5, "eta_r": 1.0, "fisher_every": 5, "probes": 8, "max_grad_norm": 5.0,
                       "weight_decay": 0.0, "trace_per_parameter": False, "lr_schedule": "constant"}

    def check_method(self) -> None:
        self.positive("steps", "lr", "batch_size", "fisher_every", "probes", "max_grad_norm")
        self.non_negative("momentum", "eta_f", "eta_r", "weight_decay")
        self.require(float(self.momentum) < 1, "momentum", "must be < 1")
        self.require(isinstance(self.trace_per_parameter, bool), "trace_per_parameter", "must be true or false")
        self.require(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {list(LR_SCHEDULES)}")

    def trainable(self, model: nn.Module) -> list[torch.Tensor]:
        return [p for p in model.parameters()]

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        gen = torch.Generator().manual_seed(seed)
        params = self.trainable(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.tunable_parameters = sum(p.numel() for p in params)
        anchors = [p.detach().clone() for p in params]
        fisher = diagonal_fisher(model, x, params, gen) if float(self.eta_r) > 0 else None
        optimizer = SGD(params, lr=float(self.lr), momentum=float(self.momentum),
                        weight_decay=float(self.weight_decay))
        scheduler = LR_SCHEDULES[self.lr_schedule](optimizer, int(self.steps))
        batches = self.batches(x, y, seed)
        self.train_mode(model)
        for step in range(int(self.steps)):
            xb, yb = next(batches)
            with autocast(x.device):
                logits = model(xb)
                ce = F.cross_entropy(logits, yb)
                loss = ce
                if float(self.eta_f) > 0 and step % int(self.fisher_every) == 0:
                    trace = fisher_trace_estimate(logits, params, gen, int(self.probes))
                    if self.trace_per_parameter:
                        trace = trace / self.tunable_parameters
                    loss = loss + float(self.eta_f) * trace
                if fisher is not None:
                    loss = loss + float(self.eta_r) * retention_penalty(params, anchors, fisher)
            # The trace term's gradient is a noisy second-order quantity; clipping keeps one unlucky
            # estimate from throwing the weights out of the basin.
            guarded_step(optimizer, loss, f"{self.name} step {step}", max_grad_norm=float(self.max_grad_norm))
            scheduler.step()
            if step % int(self.log_every) == 0:
                log({"loss": loss.item(), "ce": ce.item()}, step)
        for p in model.parameters():
            p.requires_grad_(True)
        return self.finish(model)
