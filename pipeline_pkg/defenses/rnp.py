"""`rnp`: Reconstructive Neuron Pruning (Li et al., "Reconstructive Neuron Pruning for Backdoor Defense",
ICML 2023).

Three stages, all on the clean budget only:

1. Unlearn (neuron level): a copy of the backdoored model is trained to *maximise* the cross-entropy on
   the clean budget (gradient ascent on all weights, SGD with momentum and weight decay) until its
   clean-budget accuracy falls to `unlearn_floor` or `unlearn_steps` run out. Clean features collapse
   quickly; the backdoor path, which clean data never exercises, is left largely intact.
2. Recover (filter level): on the unlearned copy every weight is frozen and one mask m ∈ [0, 1] per
   normalisation channel (starting at 1, multiplying the affine scale γ, as in the original code) is
   trained to *minimise* the clean cross-entropy for `recover_steps`, the masks clipped to [0, 1] after
   every step. Channels that bring clean accuracy back keep m near 1; channels the recovery cannot use
   — the backdoor ones — are pushed towards 0.
3. Prune: on the ORIGINAL backdoored model every channel whose recovered mask is below `threshold` is
   zeroed (γ = 0 and β = 0, so the norm layer outputs exactly 0 there). With `max_acc_drop` set, the
   threshold is instead the largest on a grid of step `threshold_step` in (0, 1] whose pruned model keeps
   the clean-budget accuracy within `max_acc_drop` of the unpruned one (clean budget only, never test
   data).

The unlearned copy and its masks are discarded; the returned model is the original one with only the
pruned channels' γ/β changed, under its original state-dict keys. The masks are attached with the same
generic `torch.nn.utils.parametrize` machinery as `nft` (every norm layer with an affine scale:
BatchNorm/InstanceNorm, LayerNorm — one entry per normalised element —, GroupNorm, RMSNorm), so no
per-architecture code is needed.

After `purify` the defense exposes `threshold` (the one used), `pruned` (number of zeroed channels),
`pruned_channels` (layer name → flat indices), `masks` (layer name → recovered mask), `unlearn_steps_run`,
`unlearned_acc` / `recovered_acc` (clean-budget accuracy of the copy after each stage) and, with
`max_acc_drop`, `threshold_scan` (grid threshold → clean-budget accuracy of the pruned model).

Notes. Gradient ascent is unbounded: with `unlearn_floor` below what the copy can reach (chance level)
the clean loss explodes within a few steps and purification stops with `TrainingDiverged`. The BN layers
of the copy follow `bn_stats` (default "frozen"); the reference code runs both stages in train mode
(`bn_stats: update`). BackdoorBench scales the recovery loss by α = 0.2, which with plain SGD is the
same as `recover_lr` = 0.2·0.2 = 0.04."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..evaluator import accuracy
from ..optim import SGD
from ..registry import DEFENSES
from ..runtime import autocast
from ..trainer import guarded_step
from .base import Defense, freeze_all_but
from .nft import ChannelMask, masked_layers


def budget_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Clean-budget accuracy in eval mode, leaving every module's train/eval flag as it was."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        return accuracy(model, x, y)
    finally:
        for m, training in modes:
            m.training = training


def layer_names(model: nn.Module, layers: list[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in layers]


@torch.no_grad()
def prune_channels(layers: list[nn.Module], prune_masks: list[torch.Tensor]) -> None:
    """Zero γ and β (where the layer has one) of the entries where `prune_masks` is True."""
    for layer, prune in zip(layers, prune_masks):
        for name in ("weight", "bias"):
            param = getattr(layer, name, None)
            if isinstance(param, torch.Tensor):
                param[prune.to(param.device)] = 0


@DEFENSES.register("rnp")
class ReconstructiveNeuronPruning(Defense):
    method_defaults = {"unlearn_steps": 50, "unlearn_floor": 0.2, "unlearn_lr": 0.01, "unlearn_momentum": 0.9,
                       "unlearn_weight_decay": 5e-4, "recover_steps": 200, "recover_lr": 0.2,
                       "recover_momentum": 0.9, "batch_size": 128, "threshold": 0.2, "max_acc_drop": None,
                       "threshold_step": 0.05}

    def check_method(self) -> None:
        for key in ("unlearn_steps", "recover_steps", "batch_size"):
            value = self.params[key]
            self.require(isinstance(value, (int, float)) and not isinstance(value, bool)
                         and math.isfinite(float(value)) and float(value) == int(value) and int(value) > 0,
                         key, "must be a positive integer")
        for key in ("unlearn_floor", "unlearn_lr", "unlearn_momentum", "unlearn_weight_decay", "recover_lr",
                    "recover_momentum", "threshold", "threshold_step"):
            value = self.params[key]
            self.require(isinstance(value, (int, float)) and not isinstance(value, bool)
                         and math.isfinite(float(value)), key, "must be a finite number")
        self.positive("unlearn_lr", "recover_lr", "threshold_step")
        self.non_negative("unlearn_momentum", "recover_momentum", "unlearn_weight_decay")
        for key in ("unlearn_momentum", "recover_momentum"):
            self.require(float(self.params[key]) < 1, key, "must be < 1")
        for key in ("unlearn_floor", "threshold", "threshold_step"):
            self.require(0 <= float(self.params[key]) <= 1, key, "must be in [0, 1]")
        drop = self.max_acc_drop
        if drop is not None:
            self.require(isinstance(drop, (int, float)) and not isinstance(drop, bool)
                         and math.isfinite(float(drop)) and 0 <= float(drop) <= 1,
                         "max_acc_drop", "must be null or a number in [0, 1]")

    # --- stage 1 ---

    def unlearn(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int, log) -> nn.Module:
        """A copy of `model` after gradient ascent on the clean cross-entropy down to the accuracy floor;
        `model` itself is not touched."""
        copy_ = copy.deepcopy(model)
        params = list(copy_.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = SGD(params, lr=float(self.unlearn_lr), momentum=float(self.unlearn_momentum),
                        weight_decay=float(self.unlearn_weight_decay))
        batches = self.batches(x, y, seed)
        floor = float(self.unlearn_floor)
        self.train_mode(copy_)
        acc = budget_accuracy(copy_, x, y)
        steps = 0
        try:
            while acc > floor and steps < int(self.unlearn_steps):
                xb, yb = next(batches)
                with autocast(x.device):
                    ce = F.cross_entropy(copy_(xb), yb)
                guarded_step(optimizer, -ce, f"{self.name} unlearn step {steps}")  # ASCENT on the clean loss
                steps += 1
                acc = budget_accuracy(copy_, x, y)
                if (steps - 1) % int(self.log_every) == 0:
                    log({"unlearn_ce": ce.item(), "unlearn_acc": acc}, steps - 1)
        finally:
            self.finish(copy_)
        self.unlearn_steps_run = steps
        self.unlearned_acc = acc
        return copy_

    # --- stage 2 ---

    def recover(self, unlearned: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int,
                log) -> list[torch.Tensor]:
        """Per-channel masks in [0, 1] on the norm scales of the (frozen) unlearned model, trained to
        minimise the clean cross-entropy; returned detached, one tensor per masked layer in module order.
        The unlearned model is consumed (left parametrized)."""
        layers = masked_layers(unlearned)
        masks: list[nn.Parameter] = []
        for layer in layers:
            parametrize.register_parametrization(layer, "weight", ChannelMask(layer.weight))
            masks.append(layer.parametrizations.weight[0].mask)
        freeze_all_but(unlearned, masks)
        self.tunable_parameters = sum(m.numel() for m in masks)
        optimizer = SGD(masks, lr=float(self.recover_lr), momentum=float(self.recover_momentum))
        batches = self.batches(x, y, seed + 1)
        self.train_mode(unlearned)
        try:
            for step in range(int(self.recover_steps)):
                xb, yb = next(batches)
                with autocast(x.device):
                    loss = F.cross_entropy(unlearned(xb), yb)
                guarded_step(optimizer, loss, f"{self.name} recover step {step}")
                with torch.no_grad():
                    for m in masks:
                        m.clamp_(0.0, 1.0)
                if step % int(self.log_every) == 0:
                    log({"recover_loss": loss.item(),
                         "mask_mean": sum(m.sum().item() for m in masks) / self.tunable_parameters},
                        getattr(self, "unlearn_steps_run", 0) + step)
            self.recovered_acc = budget_accuracy(unlearned, x, y)
        finally:
            self.finish(unlearned)
        return [m.detach().clone() for m in masks]

    # --- stage 3 ---

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        layers = masked_layers(model)
        if not layers:
            raise ValueError(f"{self.name}: the model has no normalisation layer with an affine scale to mask")
        if len(x) == 0:
            raise ValueError(f"{self.name}: the clean budget is empty")
        names = layer_names(model, layers)

        unlearned = self.unlearn(model, x, y, seed=seed, log=log)
        masks = self.recover(unlearned, x, y, seed=seed, log=log)
        del unlearned
        self.masks = dict(zip(names, masks))

        model.eval()
        if self.max_acc_drop is None:
            threshold = float(self.params["threshold"])  # self.threshold is the one last used
        else:
            threshold = self.search_threshold(model, layers, masks, x, y, log)
        prune = [m < threshold for m in masks]
        prune_channels(layers, prune)
        self.threshold = threshold
        self.pruned_channels = {n: p.flatten().nonzero().flatten().tolist() for n, p in zip(names, prune)}
        self.pruned = int(sum(int(p.sum()) for p in prune))
        self.diagnostics = {"pruned": self.pruned, "threshold": threshold}
        log({"threshold": threshold, "pruned": float(self.pruned), "unlearn_steps": float(self.unlearn_steps_run),
             "unlearned_acc": self.unlearned_acc, "recovered_acc": self.recovered_acc},
            self.unlearn_steps_run + int(self.recover_steps))
        return self.finish(model)

    @torch.no_grad()
    def search_threshold(self, model: nn.Module, layers: list[nn.Module], masks: list[torch.Tensor],
                         x: torch.Tensor, y: torch.Tensor, log) -> float:
        """The largest grid threshold in (0, 1] whose pruning keeps the clean-budget accuracy within
        `max_acc_drop` of the unpruned model's; 0 (prune nothing) if none does. `model` is left as it was."""
        saved = [{name: getattr(layer, name).detach().clone() for name in ("weight", "bias")
                  if isinstance(getattr(layer, name, None), torch.Tensor)} for layer in layers]

        def restore() -> None:
            for layer, params in zip(layers, saved):
                for name, value in params.items():
                    getattr(layer, name).copy_(value)

        baseline = budget_accuracy(model, x, y)
        step = float(self.threshold_step)
        grid = sorted({min(1.0, round(k * step, 10)) for k in range(1, math.ceil(1 / step - 1e-9) + 1)})
        best = 0.0
        self.threshold_scan: dict[float, float] = {}
        try:
            for t in grid:
                prune_channels(layers, [m < t for m in masks])
                acc = budget_accuracy(model, x, y)
                restore()
                self.threshold_scan[t] = acc
                log({"scan_threshold": t, "clean_budget_acc": acc}, len(self.threshold_scan))
                if baseline - acc <= float(self.max_acc_drop) + 1e-12:
                    best = t
        finally:
            restore()
        return best
