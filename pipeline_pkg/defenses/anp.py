"""`anp`: Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021).

Premise: neurons of a backdoor path are sensitive to small adversarial perturbations — perturbing them
wakes the trigger path even on clean inputs, so the clean loss rises — while benign neurons are not.
ANP learns which neurons the clean loss can do without under perturbation and prunes them.

Every normalisation layer with an affine scale (BatchNorm/InstanceNorm, GroupNorm and RMSNorm: one
neuron per channel; LayerNorm: one per normalised element) gets, through `torch.nn.utils.parametrize`,
a mask m ∈ [0, 1] (starting at 1) and multiplicative noises δ, ξ ∈ [−ε, ε] — the paper's full form:

    γ ↦ γ·(m + δ),    β ↦ β·(1 + ξ)     (β·(1 + ξ) only where the layer has a shift β).

Per batch of the clean budget (all weights frozen):

1. inner step (maximise over the noise): δ, ξ start uniform in [−ε, ε] (`rand_init`; else at 0) and
   take `anp_steps` signed-gradient ascent steps of size ε/`anp_steps` on CE(clean, masks + noise),
   each projected back onto [−ε, ε] (the reference code does not project, so its noise can reach 2ε;
   the paper's formulation, followed here, keeps it in the ε-box);
2. outer step (minimise over the masks): α·CE(clean, masks, no noise) + (1 − α)·CE(clean, masks +
   noise) by SGD (lr 0.2, momentum 0.9), then m is clipped to [0, 1]. With ε = 0 there is no noise
   and the outer loss is CE(clean, masks).

The reference code's settings are the defaults here — ε = 0.4, α = 0.2, one inner step, mask SGD with
lr 0.2 and momentum 0.9, batch 128 — except the step count, 500 instead of its 2,000 (its clean set is
500 CIFAR-10 images; ours are smaller). Its BatchNorm mode too: ANP's `bn_stats` default is "batch",
not the common "frozen", because the reference code (optimize_mask_cifar.py) trains the masks with the
model in train mode, i.e. on batch statistics; on the backdoored model's running statistics the masks
were measured not to be selective (on a blend model 165 of 420 fell below 0.05), so every threshold
cost too much clean accuracy and nothing was pruned. Normalised by a clean batch's own statistics,
a trigger channel that running statistics keep dormant fires on clean inputs, so the clean loss drives
its mask to 0. "batch" has momentum 0, and in every mode the model leaves the mask optimisation with
exactly the parameters and buffers (running statistics, num_batches_tracked) it came in with: as the
reference prunes the original checkpoint (prune_neuron_cifar.py), the threshold search and the
returned model use the original running statistics, in eval mode. Batch statistics need two samples
(BatchNorm after pooling cannot normalise one), so unless `bn_stats` is "frozen", `batch_size` and
the clean budget must be ≥ 2.

Pruning. The soft masks are not kept as scales: neurons whose mask is below a threshold are removed,
their γ and β set to 0 so the neuron's output after the norm layer is exactly 0 (the reference code
zeroes only γ, leaving a constant β; zeroing both removes the neuron outright). Every other value of
the model stays bit-for-bit unchanged. The threshold is the largest of the grid `threshold_step`,
2·`threshold_step`, … ≤ `max_threshold` whose pruned model's accuracy on the CLEAN BUDGET falls by at
most `max_acc_drop` below the unpruned model's (0, i.e. no pruning, when none qualifies). It is chosen
from the clean budget only: `purify` never sees test data. BackdoorBench's ANP keeps, among its pruned
candidates, the one with the lowest attack success rate on the (triggered) TEST set within an accuracy
drop — test-data leakage that overstates the defense (the reference code only prints test curves and
the paper fixes the threshold at 0.2); this implementation does not do that.

The returned model has a plain state dict with the original keys, in the original order.
`tunable_parameters` is the number of mask entries; `pruned` the number of pruned neurons and
`threshold` the chosen threshold; `masks` keeps the final mask values (CPU tensors, one per layer in
module order) for inspection."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..evaluator import accuracy
from ..optim import SGD
from ..registry import DEFENSES
from ..runtime import autocast
from ..trainer import check_finite, guarded_step
from .base import Defense
from .nft import masked_layers

# Accuracies are fractions k/n; this keeps e.g. 0.90 − 0.85 ≤ 0.05 true despite float round-off.
_ACC_TOLERANCE = 1e-9


class ScalePerturbation(nn.Module):
    """γ ↦ γ·(m + δ) while perturbed, γ·m otherwise; m starts at 1, δ at 0 (both of γ's shape)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.mask = nn.Parameter(torch.ones_like(weight))
        self.noise = nn.Parameter(torch.zeros_like(weight))
        self.perturbed = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (self.mask + self.noise if self.perturbed else self.mask)


class ShiftPerturbation(nn.Module):
    """β ↦ β·(1 + ξ) while perturbed, β otherwise; ξ starts at 0."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.noise = nn.Parameter(torch.zeros_like(bias))
        self.perturbed = False

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return bias * (1 + self.noise) if self.perturbed else bias


def _has(layer: nn.Module, name: str) -> bool:
    return isinstance(getattr(layer, name, None), torch.Tensor)


def attach(layers: Sequence[nn.Module]) -> tuple[list[ScalePerturbation], list[ShiftPerturbation]]:
    """Parametrize γ (and β where present) of each layer; return the scale and shift parametrizations."""
    scales, shifts = [], []
    for layer in layers:
        scale = ScalePerturbation(layer.weight)
        parametrize.register_parametrization(layer, "weight", scale)
        scales.append(scale)
        if _has(layer, "bias"):
            shift = ShiftPerturbation(layer.bias)
            parametrize.register_parametrization(layer, "bias", shift)
            shifts.append(shift)
    return scales, shifts


def detach_all(layers: Sequence[nn.Module], key_orders: Sequence[list[str]]) -> None:
    """Remove the parametrizations, restoring the untouched γ/β parameter objects in their order."""
    for layer, order in zip(layers, key_orders):
        for name in ("weight", "bias"):
            if parametrize.is_parametrized(layer, name):
                parametrize.remove_parametrizations(layer, name, leave_parametrized=False)
        for key in order:
            layer._parameters[key] = layer._parameters.pop(key)


def set_perturbed(parts: Sequence[nn.Module], on: bool) -> None:
    for part in parts:
        part.perturbed = on


def threshold_grid(step: float, maximum: float) -> list[float]:
    """step, 2·step, … up to `maximum` (inclusive, up to round-off)."""
    count = int(math.floor(maximum / step + 1e-9))
    return [round(k * step, 12) for k in range(1, count + 1)]


def select_threshold(thresholds: Sequence[float], accuracy_at: Callable[[float], float], baseline: float,
                     max_acc_drop: float) -> tuple[float, list[tuple[float, float]]]:
    """The largest threshold t with baseline − accuracy_at(t) ≤ max_acc_drop, or 0.0 (prune nothing)
    when none qualifies; and the (t, accuracy) pairs evaluated. Thresholds are tried from the largest
    down, so the search stops at the first that qualifies. `accuracy_at` must measure the clean budget
    only — never test data."""
    curve = []
    for t in sorted(thresholds, reverse=True):
        acc = accuracy_at(t)
        curve.append((t, acc))
        if baseline - acc <= max_acc_drop + _ACC_TOLERANCE:
            return t, curve
    return 0.0, curve


@torch.no_grad()
def prune_(layers: Sequence[nn.Module], masks: Sequence[torch.Tensor], threshold: float) -> list[int]:
    """Zero γ and β (in place) of every neuron whose mask is below `threshold`; the count per layer."""
    counts = []
    for layer, mask in zip(layers, masks):
        off = (mask < threshold).to(layer.weight.device)
        layer.weight[off] = 0
        if _has(layer, "bias"):
            layer.bias[off] = 0
        counts.append(int(off.sum()))
    return counts


@DEFENSES.register("anp")
class AdversarialNeuronPruning(Defense):
    method_defaults = {"steps": 500, "lr": 0.2, "momentum": 0.9, "batch_size": 128, "eps": 0.4,
                       "anp_steps": 1, "alpha": 0.2, "rand_init": True, "max_acc_drop": 0.05,
                       "threshold_step": 0.05, "max_threshold": 0.95,
                       # the reference code's train mode; frozen statistics gave non-selective masks
                       "bn_stats": "batch"}

    def check_method(self) -> None:
        for key in ("steps", "lr", "momentum", "batch_size", "eps", "anp_steps", "alpha", "max_acc_drop",
                    "threshold_step", "max_threshold"):
            value = self.params[key]
            self.require(isinstance(value, (int, float)) and not isinstance(value, bool)
                         and math.isfinite(float(value)), key, "must be a finite number")
        self.positive("steps", "lr", "batch_size", "anp_steps", "threshold_step", "max_threshold")
        self.non_negative("momentum", "eps", "max_acc_drop")
        for key in ("steps", "batch_size", "anp_steps"):
            self.require(float(self.params[key]) == int(self.params[key]), key, "must be an integer")
        self.require(float(self.momentum) < 1, "momentum", "must be < 1")
        self.require(0 <= float(self.alpha) <= 1, "alpha", "must be in [0, 1]")
        self.require(float(self.max_threshold) <= 1, "max_threshold", "must be in (0, 1]")
        self.require(float(self.threshold_step) <= float(self.max_threshold), "threshold_step",
                     "must not exceed max_threshold")
        self.require(isinstance(self.rand_init, bool), "rand_init", "must be true or false")
        # one sample has no batch statistics (BatchNorm1d after pooling raises on it)
        self.require(self.bn_stats == "frozen" or int(self.batch_size) >= 2, "batch_size",
                     f"must be ≥ 2 with bn_stats={self.bn_stats!r} (batch statistics)")

    # --- mask optimisation ---

    def optimise_masks(self, model: nn.Module, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                       *, seed: int, log) -> list[torch.Tensor]:
        """Run ANP's min-max over masks and noise; return the final masks (detached, CPU). The model
        leaves with exactly the parameters, buffers and requires_grad flags it came in with."""
        requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        key_orders = [list(layer._parameters) for layer in layers]
        # Buffers of every norm layer, affine or not: "update" moves the running statistics and both
        # "update" and "batch" count num_batches_tracked (a non-finite batch would even turn the running
        # statistics to NaN under momentum 0). ANP prunes the original model, so they are put back.
        buffers = [(b, b.clone()) for b in model.buffers()]
        eps, alpha = float(self.eps), float(self.alpha)
        inner = int(self.anp_steps)
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            scales, shifts = attach(layers)
            parts = [*scales, *shifts]
            masks = [s.mask for s in scales]
            noises = [s.noise for s in scales] + [s.noise for s in shifts]
            self.tunable_parameters = sum(m.numel() for m in masks)
            optimizer = SGD(masks, lr=float(self.lr), momentum=float(self.momentum))
            batches = self.batches(x, y, seed)
            gen = torch.Generator().manual_seed(seed)
            self.train_mode(model)
            for step in range(int(self.steps)):
                xb, yb = next(batches)
                # 1. adversarial neuron perturbation: maximise the clean loss over δ, ξ ∈ [−ε, ε]
                if eps > 0:
                    with torch.no_grad():
                        for n in noises:
                            start = (torch.rand(n.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps \
                                if self.rand_init else torch.zeros(n.shape, dtype=torch.float64)
                            n.copy_(start.to(n.dtype))
                    set_perturbed(parts, True)
                    for _ in range(inner):
                        with autocast(x.device):
                            adv = F.cross_entropy(model(xb), yb)
                        check_finite(adv, f"{self.name} step {step} (perturbation)")
                        grads = torch.autograd.grad(adv, noises)
                        with torch.no_grad():
                            for n, g in zip(noises, grads):
                                n.add_(g.sign(), alpha=eps / inner).clamp_(-eps, eps)
                # 2. masks: α·CE(masks) + (1 − α)·CE(masks + noise), then clip to [0, 1]
                for n in noises:
                    n.requires_grad_(False)
                set_perturbed(parts, False)
                with autocast(x.device):
                    ce_clean = F.cross_entropy(model(xb), yb)
                if eps > 0:
                    set_perturbed(parts, True)
                    with autocast(x.device):
                        ce_noisy = F.cross_entropy(model(xb), yb)
                    set_perturbed(parts, False)
                    loss = alpha * ce_clean + (1 - alpha) * ce_noisy
                else:
                    ce_noisy = ce_clean
                    loss = ce_clean
                guarded_step(optimizer, loss, f"{self.name} step {step}")
                with torch.no_grad():
                    for m in masks:
                        m.clamp_(0.0, 1.0)
                for n in noises:
                    n.requires_grad_(True)
                if step % int(self.log_every) == 0:
                    with torch.no_grad():
                        log({"loss": loss.item(), "ce_clean": ce_clean.item(), "ce_perturbed": ce_noisy.item(),
                             "mask_mean": sum(m.sum().item() for m in masks) / self.tunable_parameters,
                             "mask_min": min(m.min().item() for m in masks),
                             "mask_max": max(m.max().item() for m in masks),
                             "noise_absmax": max((n.abs().max().item() for n in noises), default=0.0)}, step)
            return [m.detach().float().cpu().clone() for m in masks]
        finally:
            detach_all(layers, key_orders)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p in model.parameters():
                p.requires_grad_(requires_grad.get(id(p), True))
            self.finish(model)

    # --- purification ---

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        """Purify `model` in place from the clean budget (x, y) alone."""
        layers = masked_layers(model)
        if not layers:
            raise ValueError(f"{self.name}: the model has no normalisation layer with an affine scale to perturb")
        if len(x) == 0:
            raise ValueError(f"{self.name}: the clean budget is empty")
        if len(x) < 2 and self.bn_stats != "frozen":
            raise ValueError(f"{self.name}: bn_stats={self.bn_stats!r} needs at least 2 clean samples "
                             "(batch statistics); use bn_stats: frozen")
        masks = self.optimise_masks(model, layers, x, y, seed=seed, log=log)
        self.masks = masks

        originals = [(layer.weight.detach().clone(), layer.bias.detach().clone() if _has(layer, "bias") else None)
                     for layer in layers]

        @torch.no_grad()
        def restore() -> None:
            for layer, (w, b) in zip(layers, originals):
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)

        def accuracy_at(threshold: float) -> float:
            try:
                prune_(layers, masks, threshold)
                return accuracy(model, x, y)
            finally:
                restore()

        # The masks were trained with batch statistics (by default), but the threshold is judged on the
        # model that will be returned: eval mode, original running statistics (`accuracy` sets eval).
        baseline = accuracy(model, x, y)
        threshold, curve = select_threshold(threshold_grid(float(self.threshold_step), float(self.max_threshold)),
                                            accuracy_at, baseline, float(self.max_acc_drop))
        for i, (t, acc) in enumerate(curve):
            log({"threshold": t, "clean_budget_acc": acc, "clean_budget_acc_unpruned": baseline},
                int(self.steps) + i)
        self.pruned_per_layer = prune_(layers, masks, threshold)
        self.pruned = sum(self.pruned_per_layer)
        self.threshold = threshold
        self.diagnostics = {"pruned": self.pruned, "threshold": threshold}
        self.baseline_acc = baseline
        self.pruned_acc = accuracy(model, x, y)
        return self.finish(model)
