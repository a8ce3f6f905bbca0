"""`nad`: Neural Attention Distillation (Li et al., "Neural Attention Distillation: Erasing Backdoor
Triggers from Deep Neural Networks", ICLR 2021).

1. Teacher: a copy of the backdoored model fine-tuned on the clean budget for `teacher_steps` (the `ft`
   defense, with this defense's lr / momentum / weight decay / batch size; `teacher_steps: 0` keeps the
   backdoored model as teacher, an ablation).
2. Student: the backdoored model itself, trained on the clean budget with

       CE(f_s(x), y) + β·Σ_l mean_batch ‖a_s^l − a_t^l‖₂,

   where the attention map of a feature tensor f of shape (N, C, *spatial) is
   a = normalise(flatten(mean_c |f|^p)), L2-normalised per sample, so it is independent of the
   feature's scale and of whether the features are 1-D (N, C, L) or 2-D (N, C, H, W).

Layers: by default the outputs of the last `n_layers` modules of `model.features` (its direct children;
single-child wrappers are looked through) whose output has a spatial extent (ndim ≥ 3 and more than one
position, so a global pool's (N, C, 1) output does not count), found with forward hooks on a dry
forward pass; for rf_cnn these are the last three conv blocks, for conv5 the
max-pool and the two residual blocks. `layers` names modules explicitly, as in `model.named_modules()`
(e.g. "features.2", "features.5.body").

β: the paper uses β = 5000 for CIFAR-10 on 3 ResNet groups (2000–5000 across its datasets), but that
value belongs to its released code, which takes the *mean squared* difference of the normalised maps over
32×32…8×8 maps; here the loss is the L2 norm of the difference, as in the paper's equation, which is
O(1) per layer (at most 2) and has a gradient that does not shrink as the maps align. On the RF models
(rf_cnn, 1-D maps of 8–32 positions, 64 clean frames, lr 0.01) β = 5000 gives a NaN loss at step 2,
and β = 50 already ends at chance accuracy. β = 10 is the default here.
On three tiny burst-backdoored rf_cnn models (config/tiny.yaml, seeds 0–2, ASR ≈ 98–99 %) with the
default 100 teacher + 300 student steps, ASR / ACC after:
    ft (300 steps)   90 / 59 %   86 / 57 %   85 / 55 %
    nad β = 5        79 / 59 %   64 / 60 %   71 / 57 %
    nad β = 10       48 / 56 %   13 / 54 %   53 / 56 %
    nad β = 15       18 / 58 %   17 / 47 %   14 / 56 %
    nad β = 20       21 / 40 %   11 / 48 %    2 / 56 %
(ACC before: 60.8 / 64.5 / 63.3 %.) The response to β is steep and not monotone, and part of the effect is
the attention term disturbing training rather than the teacher's guidance: with `teacher_steps: 0` (the
backdoored model as its own teacher) β = 10 still lowered ASR, to 21 %, at 37.5 % ACC. Tune β per
dataset and architecture; `beta: 0` is exactly plain fine-tuning of the student."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..configurable import ConfigError
from ..models import count_parameters
from ..optim import SGD, CosineAnnealingLR
from ..registry import DEFENSES
from ..runtime import autocast
from ..trainer import guarded_step
from .base import Defense


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(N, C, *spatial) → (N, prod(spatial)): the channel mean of |f|^p, L2-normalised per sample."""
    if f.ndim < 3:
        raise ValueError(f"attention maps need a feature tensor (N, C, *spatial), got shape {tuple(f.shape)}")
    a = f.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(a, p=2, dim=1)


def attention_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean over the batch of ‖a_s − a_t‖₂ (each term at most 2, the maps having unit norm)."""
    return (attention_map(f_s, p) - attention_map(f_t, p)).norm(dim=1).mean()


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The direct children of `model.features` (looking through single-child wrappers), with their names
    in `model.named_modules()`; `features` itself when it has no children."""
    name, module = "features", model.features
    while len(list(module.children())) == 1:
        child_name, module = next(iter(module.named_children()))
        name = f"{name}.{child_name}"
    children = list(module.named_children())
    if not children:
        return [(name, module)]
    return [(f"{name}.{child}", m) for child, m in children]


@torch.no_grad()
def output_shapes(model: nn.Module, modules: list[tuple[str, nn.Module]],
                  sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape of each named module on a dry forward pass (eval mode, no gradients, so no running
    statistic changes); modules that do not run, or return no tensor, are left out."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook_for(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape)
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules]
    was_training = model.training
    try:
        model.eval()
        model(sample)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def has_spatial(shape: tuple[int, ...]) -> bool:
    """(N, C, *spatial) with more than one spatial position: a global pool's (N, C, 1) output has an
    attention map that is always 1, nothing to distil."""
    return len(shape) >= 3 and math.prod(shape[2:]) > 1


def spatial_layers(model: nn.Module, sample: torch.Tensor, n_layers: int) -> list[str]:
    """Names of the last `n_layers` modules of `model.features` whose output has a spatial extent."""
    candidates = _candidates(model)
    shapes = output_shapes(model, candidates, sample)
    spatial = [name for name, _ in candidates if has_spatial(shapes.get(name, ()))]
    if not spatial:
        raise ValueError("nad: no module of model.features has a spatial output (N, C, *spatial) to distil")
    return spatial[-n_layers:]


class FeatureRecorder:
    """Forward hooks that keep the latest output of each named module, cloned: the maps are computed after
    the whole forward pass, by when a following in-place activation (ReLU(inplace=True) after a norm
    layer) would have overwritten the module's own output."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.outputs[name] = output.clone()
        return hook

    def take(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"nad: layer(s) {missing} did not run in the forward pass")
        out = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@DEFENSES.register("nad")
class NeuralAttentionDistillation(Defense):
    method_defaults = {"teacher_steps": 100, "steps": 300, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                       "batch_size": 128, "beta": 10.0, "p": 2.0, "n_layers": 3, "layers": None,
                       "max_grad_norm": None}

    def check_method(self) -> None:
        for key in ("teacher_steps", "steps", "batch_size", "n_layers"):
            value = self.params[key]
            self.require(not isinstance(value, bool) and isinstance(value, (int, float))
                         and float(value) == int(value), key, "must be an integer")
        for key in ("lr", "momentum", "weight_decay", "beta", "p"):
            value = self.params[key]
            self.require(not isinstance(value, bool) and isinstance(value, (int, float))
                         and math.isfinite(float(value)), key, "must be a finite number")
        self.positive("steps", "lr", "batch_size", "p", "n_layers")
        self.non_negative("teacher_steps", "momentum", "weight_decay", "beta")
        self.require(float(self.momentum) < 1, "momentum", "must be < 1")
        self.positive_or_none("max_grad_norm")
        layers = self.layers
        self.require(layers is None or (isinstance(layers, (list, tuple)) and len(layers) > 0
                                        and all(isinstance(n, str) and n for n in layers)),
                     "layers", "must be null or a non-empty list of module names")

    def attention_layers(self, model: nn.Module, sample: torch.Tensor) -> list[str]:
        """The distilled layers: `layers` if given (checked to exist and to have spatial outputs), else
        the last `n_layers` spatial outputs of `model.features`."""
        if self.layers is None:
            return spatial_layers(model, sample, int(self.n_layers))
        names = list(self.layers)
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ConfigError(f"defense {self.name!r}: parameter layers names unknown module(s) {unknown}; "
                              f"valid names are those of model.named_modules(), e.g. "
                              f"{[n for n, _ in _candidates(model)][:8]}")
        shapes = output_shapes(model, [(n, modules[n]) for n in names], sample)
        flat = [n for n in names if not has_spatial(shapes.get(n, ()))]
        if flat:
            raise ConfigError(f"defense {self.name!r}: parameter layers: module(s) {flat} have no spatial "
                              f"output (N, C, *spatial) with more than one position in the forward pass")
        return names

    def train_teacher(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
        teacher = copy.deepcopy(model)
        if int(self.teacher_steps) > 0:
            tuner = DEFENSES.get("ft")(steps=int(self.teacher_steps), lr=float(self.lr),
                                       momentum=float(self.momentum), weight_decay=float(self.weight_decay),
                                       batch_size=int(self.batch_size), bn_stats=self.bn_stats,
                                       max_grad_norm=self.max_grad_norm)
            tuner.clean_augment = self.clean_augment
            tuner.purify(teacher, x, y, seed=seed)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher.eval()

    def purify(self, model, x, y, *, seed, log=lambda m, s: None):
        if len(x) == 0:
            raise ValueError(f"{self.name}: the clean budget is empty")
        names = self.attention_layers(model, x[:2])
        self.layer_names = names
        teacher = self.train_teacher(model, x, y, seed)
        beta, p = float(self.beta), float(self.p)

        self.train_mode(model)
        params = [p_ for p_ in model.parameters()]
        for p_ in params:
            p_.requires_grad_(True)
        self.tunable_parameters = count_parameters(model)
        optimizer = SGD(params, lr=float(self.lr), momentum=float(self.momentum),
                        weight_decay=float(self.weight_decay))
        scheduler = CosineAnnealingLR(optimizer, int(self.steps))
        batches = self.batches(x, y, seed)
        student_rec, teacher_rec = FeatureRecorder(model, names), FeatureRecorder(teacher, names)
        try:
            for step in range(int(self.steps)):
                xb, yb = next(batches)
                with autocast(x.device):
                    with torch.no_grad():
                        teacher(xb)
                    ce = F.cross_entropy(model(xb), yb)
                at = sum(attention_loss(f_s, f_t, p) for f_s, f_t in zip(student_rec.take(), teacher_rec.take()))
                loss = ce + beta * at
                guarded_step(optimizer, loss, f"{self.name} step {step}", max_grad_norm=self.max_grad_norm)
                scheduler.step()
                if step % int(self.log_every) == 0:
                    log({"loss": loss.item(), "ce": ce.item(), "at": float(at.detach())}, step)
        finally:
            student_rec.remove()
            teacher_rec.remove()
        return self.finish(model)
