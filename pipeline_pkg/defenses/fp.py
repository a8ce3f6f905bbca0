"""`fp`: Fine-Pruning (Liu et al., 2018). Units of the last feature layer that clean data leaves dormant
are where a backdoor can hide: prune them in order of increasing mean clean activation until the
clean-budget accuracy falls by more than `max_acc_drop`, then fine-tune the pruned model.

The last feature layer is the classifier's input, which every architecture has (`features` /
`classifier`), so no per-architecture code is needed; pruning zeroes the classifier's weight columns
and keeps them at zero while fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from ..evaluator import accuracy
from ..optim import SGD
from ..registry import DEFENSES
from ..runtime import autocast
from ..trainer import guarded_step
from .base import Defense


@torch.no_grad()
def mean_clean_activation(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Mean activation of each classifier input unit over the clean samples."""
    model.eval()
    return torch.cat([model.features(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)]).mean(0)


@DEFENSES.register("fp")
class FinePruning(Defense):
    method_defaults = {"max_acc_drop": 0.05, "prune_step": 0.05, "max_prune": 0.95, "steps": 100,
                       "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128}

    def check_method(self) -> None:
        self.positive("prune_step", "max_prune", "lr", "batch_size")
        self.non_negative("max_acc_drop", "steps", "momentum", "weight_decay")
        self.require(float(self.max_prune) < 1, "max_prune", "must be below 1")

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        classifier: nn.Linear = model.classifier
        order = mean_clean_activation(model, x).argsort()  # most dormant first
        n_units = classifier.in_features
        baseline = accuracy(model, x, y)
        mask = torch.ones_like(classifier.weight)
        prune.custom_from_mask(classifier, "weight", mask)
        pruned = 0
        # Prune in steps while the clean budget's accuracy stays within the allowed drop.
        step = max(1, int(round(float(self.prune_step) * n_units)))
        for k in range(step, int(float(self.max_prune) * n_units) + 1, step):
            trial = torch.ones_like(mask)
            trial[:, order[:k]] = 0
            classifier.weight_mask.copy_(trial)
            acc = accuracy(model, x, y)
            log({"pruned_units": float(k), "clean_budget_acc": acc}, k)
            if baseline - acc > float(self.max_acc_drop):
                break
            pruned = k
        final = torch.ones_like(mask)
        final[:, order[:pruned]] = 0
        classifier.weight_mask.copy_(final)
        self.pruned_units = pruned

        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        self.tunable_parameters = sum(p.numel() for p in params)
        optimizer = SGD(params, lr=float(self.lr), momentum=float(self.momentum),
                        weight_decay=float(self.weight_decay))
        batches = self.batches(x, y, seed)
        self.train_mode(model)
        for step_index in range(int(self.steps)):
            xb, yb = next(batches)
            with autocast(x.device):
                loss = F.cross_entropy(model(xb), yb)
            guarded_step(optimizer, loss, f"fp step {step_index}")
            if step_index % int(self.log_every) == 0:
                log({"loss": loss.item()}, step_index)
        prune.remove(classifier, "weight")  # bake the zeros in: a plain state dict again
        return self.finish(model)
