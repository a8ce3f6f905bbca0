"""`nft`: Neural mask Fine-Tuning (Karim et al., "Augmented Neural Fine-Tuning for Efficient Backdoor
Purification", ECCV 2024).

Every weight stays frozen; NFT learns one multiplicative mask m per normalisation channel, so that a
norm layer's affine scale γ becomes γ·m (m starts at 1). The masks are trained on MixUp of the clean
budget (λ ~ Beta(α, α) per batch) with loss

    λ·CE(f(x̃), y_a) + (1 − λ)·CE(f(x̃), y_b) + (c / N_c)·Σ|1 − m|,

N_c being the clean samples per class; after every optimiser step the masks of the l-th masked layer
(module order, l = 1, 2, …, L) are clipped to [a·exp(−b·l), 1], so deeper layers may be scaled down
further. SGD with momentum; the learning rate follows a cosine from `lr` down to the floor `lr_min`,
advanced once every `lr_every` steps (constant within each block of `lr_every` steps), so the last
block still trains above `lr_min` and the rate after the run is `lr_min`, not 0.
At the end the masks are baked into γ: the returned model has a plain state dict with the original keys.

The masks are attached generically with `torch.nn.utils.parametrize` to the `weight` of every
normalisation layer that has one (BatchNorm/InstanceNorm, LayerNorm — one mask entry per normalised
element —, GroupNorm, RMSNorm), so no per-architecture code is needed. (The official code masks only
BatchNorm, through its own Masked_BN2d / Masked_BN1d layers in src/networks/mask_filter.py.)

Defaults, checked against the official code (repository nazmul-karim170/NFT, src/Remove_Backdoor.py,
unchanged from commit 8712400 to 9e40cac; line numbers of that file), all of which agree with it:
- `steps` 1000: `--nb-epochs` (l. 317, default 1000, "the number of iterations for training"). main()
  runs nb_iterations = ceil(nb_epochs / epoch_aggregation) = 5 passes of NFT_Train (l. 137, 169), each
  over a loader with RandomSampler(replacement=True, num_samples=epoch_aggregation·batch_size)
  (l. 117-120), i.e. 200 batches, one mask step per batch: 1000 mask steps.
- `lr` 0.05: `--lr` (l. 316, default 0.05).
- `momentum` 0.95: main() builds torch.optim.SGD(mask_params, lr=args.lr, momentum=0.95) (l. 136), no
  weight decay.
- `batch_size` 128: `--batch-size` (l. 315, default 128).
- `c` 1e-3: NFT_Train's `loss + 0.001*L1/N_c` (l. 272), with L1 = Σ|1 − m| from Regularization()
  (l. 209-219) and N_c = len(clean_val)/num_classes in main() (l. 142; ours counts the classes present
  in the budget).
- `a` 0.8, `b` 0.5: `--alpha` 0.8 and `--beta` 0.5 (l. 340-341), used by mask_clip() (l. 222-228),
  which clamps the masks (in named_parameters order) to [alpha·exp(−beta·count_layer), 1] with
  count_layer = 1, 2, … .
- `mixup_alpha` 1.0: NFT_Train calls mixup_data(..., alpha=1) (l. 263-264), which draws
  λ = np.random.beta(α, α) (l. 233).
- `lr_min` 0.02 and `lr_every` 200: main() builds
  torch.optim.lr_scheduler.CosineAnnealingLR(mask_optimizer, nb_iterations, 0.02) (l. 141), i.e.
  T_max = 5 and eta_min = 0.02, and calls scheduler.step() once per pass of NFT_Train (l. 186), i.e.
  every epoch_aggregation = 200 mask steps (`--epoch-aggregation`, l. 318, default 200). Ours is the
  same: T_max = ceil(steps / lr_every), stepped after every `lr_every` steps and after the last step;
  with the defaults the five blocks train at 0.05, 0.0471, 0.0396, 0.0304 and 0.0229, and the rate
  ends at 0.02. A per-step cosine to 0.02 would not be the official schedule.
  The floor is absolute (not a fraction of `lr`), as in the official code, so `lr_min` must not exceed
  `lr`.

Where we differ from the official code:
- The official training loop crashes: NFT_Train's accuracy bookkeeping does `total += …` and
  `correct += …` (l. 280-281) on names it never defines (it initialises total_correct and nb_samples
  instead), an UnboundLocalError right after the first mask step and clip. We run the method's part of
  the loop for every batch (MixUp, the loss above, a step, the clip) without that bookkeeping, which
  only computes a training accuracy; the schedule above is set up in main() and does not depend on it.
- The official NFT_Train puts the whole model in train mode, so BatchNorm normalises with batch statistics
  and updates its running ones (our `bn_stats: update`); our default is the pipeline-wide `frozen` (see
  defenses/base.py for why).
- The official loader samples the clean split (val_ratio 0.01: 500 CIFAR-10 images) with replacement; we
  draw shuffled epochs of the clean budget (InfiniteBatches)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..optim import SGD, CosineAnnealingLR
from ..registry import DEFENSES
from ..runtime import autocast
from ..trainer import guarded_step
from .base import Defense

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class ChannelMask(nn.Module):
    """Parametrization γ ↦ γ·m with a learnable mask m of γ's shape, starting at 1."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.mask = nn.Parameter(torch.ones_like(weight, requires_grad=True))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def masked_layers(model: nn.Module) -> list[nn.Module]:
    """Normalisation layers with an affine scale, in module order."""
    return [m for m in model.modules()
            if isinstance(m, NORM_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)]


def clip_bounds(n_layers: int, a: float, b: float) -> list[float]:
    """Lower clip bound a·exp(−b·l) of each masked layer l = 1, 2, …, n_layers (numbered from 1, as the
    official mask_clip's count_layer); the upper bound is 1."""
    return [a * math.exp(-b * layer) for layer in range(1, n_layers + 1)]


def lr_scheduler(optimizer: SGD, steps: int, lr_min: float, lr_every: int) -> CosineAnnealingLR:
    """The official schedule: a cosine from the optimizer's lr to `lr_min` over ceil(steps / lr_every)
    scheduler steps. Call `step()` after every `lr_every` optimiser steps and after the last one
    (`lr_block_ends`), so the rate is constant within each block and `lr_min` after the run."""
    return CosineAnnealingLR(optimizer, math.ceil(steps / lr_every), eta_min=lr_min)


def lr_block_ends(step: int, steps: int, lr_every: int) -> bool:
    """Whether 0-based optimiser step `step` of `steps` closes a block of the learning-rate schedule."""
    return (step + 1) % lr_every == 0 or step + 1 == steps


def beta_sample(alpha: float, gen: torch.Generator) -> float:
    """λ ~ Beta(α, α) from a seeded generator, as G₁ / (G₁ + G₂) with G ~ Gamma(α, 1), computed in log
    space (Gamma(α) = Gamma(α + 1)·U^(1/α)) so that small α, where G underflows, still gives λ near 0
    or 1 rather than 0/0."""
    shape = torch.full((2,), float(alpha) + 1, dtype=torch.float64)
    log_g = torch._standard_gamma(shape, generator=gen).log() + \
        (1 - torch.rand(2, dtype=torch.float64, generator=gen)).log() / float(alpha)  # U in (0, 1]
    return torch.sigmoid(log_g[0] - log_g[1]).item()


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """MixUp of one batch: (λ·x + (1 − λ)·x[perm], y, y[perm], λ) with λ ~ Beta(α, α) and a random
    permutation of the batch, both from `gen` (a CPU generator). With one sample per class the
    permutation still pairs samples of different classes."""
    lam = beta_sample(alpha, gen)
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixup_loss(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


@DEFENSES.register("nft")
class NeuralMaskFineTuning(Defense):
    # Sources of each value: the module docstring.
    method_defaults = {"steps": 1000, "lr": 0.05, "momentum": 0.95, "batch_size": 128, "c": 1e-3,
                       "a": 0.8, "b": 0.5, "mixup_alpha": 1.0, "lr_min": 0.02, "lr_every": 200}

    def check_method(self) -> None:
        self.positive("steps", "lr", "batch_size", "mixup_alpha", "lr_every")
        self.non_negative("momentum", "c", "b", "lr_min")
        self.require(float(self.momentum) < 1, "momentum", "must be < 1")
        self.require(0 < float(self.a) <= 1, "a", "must be in (0, 1]")
        for key in ("steps", "batch_size", "lr_every"):
            self.require(float(self.params[key]) == int(self.params[key]), key, "must be an integer")
        for key in ("lr", "momentum", "c", "a", "b", "mixup_alpha", "lr_min"):
            self.require(math.isfinite(float(self.params[key])), key, "must be finite")
        # The floor is absolute (as the official 0.02): above `lr` the schedule would raise the rate.
        self.require(float(self.lr_min) <= float(self.lr), "lr_min", f"must be ≤ lr ({self.lr})")

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        layers = masked_layers(model)
        if not layers:
            raise ValueError(f"{self.name}: the model has no normalisation layer with an affine scale to mask")
        if len(x) == 0:
            raise ValueError(f"{self.name}: the clean budget is empty")
        requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        key_order = [list(layer._parameters) for layer in layers]
        for p in model.parameters():
            p.requires_grad_(False)
        masks: list[nn.Parameter] = []
        baked = False
        try:
            for layer in layers:
                parametrize.register_parametrization(layer, "weight", ChannelMask(layer.weight))
                masks.append(layer.parametrizations.weight[0].mask)
            self.tunable_parameters = sum(m.numel() for m in masks)
            lower = clip_bounds(len(layers), float(self.a), float(self.b))
            # N_c: clean samples per class of the budget (1 in one-shot mode).
            samples_per_class = max(1.0, len(y) / max(1, int(torch.unique(y).numel())))
            reg_weight = float(self.c) / samples_per_class
            optimizer = SGD(masks, lr=float(self.lr), momentum=float(self.momentum))
            steps, lr_every = int(self.steps), int(self.lr_every)
            scheduler = lr_scheduler(optimizer, steps, float(self.lr_min), lr_every)
            batches = self.batches(x, y, seed)
            gen = torch.Generator().manual_seed(seed)
            self.train_mode(model)
            for step in range(steps):
                xb, yb = next(batches)
                x_mix, y_a, y_b, lam = mixup(xb, yb, float(self.mixup_alpha), gen)
                with autocast(x.device):
                    ce = mixup_loss(model(x_mix), y_a, y_b, lam)
                reg = sum((1 - m).abs().sum() for m in masks)
                loss = ce + reg_weight * reg
                guarded_step(optimizer, loss, f"{self.name} step {step}")
                if lr_block_ends(step, steps, lr_every):
                    scheduler.step()
                with torch.no_grad():
                    for mask, low in zip(masks, lower):
                        mask.clamp_(low, 1.0)
                if step % int(self.log_every) == 0:
                    log({"loss": loss.item(), "ce": ce.item(), "mask_l1": reg.item(),
                         "mask_mean": sum(m.sum().item() for m in masks) / self.tunable_parameters,
                         "lam": lam}, step)
            self.mask_means = [m.mean().item() for m in masks]
            baked = True
        finally:
            # Bake γ·m into γ on success; on failure restore the untouched γ. Either way the model
            # leaves with plain parameters under the original state-dict keys, in the original order.
            for layer, order in zip(layers, key_order):
                if parametrize.is_parametrized(layer, "weight"):
                    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=baked)
                for key in order:
                    layer._parameters[key] = layer._parameters.pop(key)
            for p in model.parameters():
                p.requires_grad_(requires_grad.get(id(p), True))
            self.finish(model)
        return model
