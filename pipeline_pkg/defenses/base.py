"""What every defense provides: a backdoored model and a small clean budget in, a purified model out.

Defenses see models only through generic modules (Conv*, Linear, norm layers) and the `features` /
`classifier` split every architecture has, so each defense works on every architecture unchanged."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from ..augment import augmenter
from ..configurable import Configurable
from ..runtime import InfiniteBatches

# How normalisation layers behave while a defense trains: keep the running statistics ("frozen"), use
# batch statistics and update the running ones ("update"), or use batch statistics but keep the running
# ones ("batch").
BN_MODES = ("frozen", "update", "batch")

MetricLogger = Callable[[dict[str, float], int], None]


def _no_logging(metrics: dict[str, float], step: int) -> None:
    pass


class Defense(Configurable):
    kind = "defense"
    # Hyper-parameters every defense accepts on top of its own.
    # bn_stats "frozen": normalisation layers keep the backdoored model's running statistics. A clean-only
    # budget has near-zero variance on trigger-detecting channels, so batch statistics would blow those
    # channels up and send every input to the target class. "update" uses batch statistics instead.
    common_defaults: ClassVar[dict] = {"log_every": 20, "bn_stats": "frozen"}
    # The data a defense applies to: weight-space defenses work on every modality; an input filter
    # (sor) only on the data it filters.
    modalities: ClassVar[tuple[str, ...]] = ("rf", "image", "pointcloud")
    # A test-time defense leaves the weights alone and filters every input instead (see wrap()).
    test_time: ClassVar[bool] = False
    method_defaults: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = {**cls.common_defaults, **cls.method_defaults}

    def __init__(self, **params):
        super().__init__(**params)
        self.tunable_parameters = 0
        # Augmentation names for the clean-budget batches: the dataset's `clean_budget.augment`, set by
        # stages.make_defense (a property of the data, not of the method, so not a hyper-parameter).
        self.clean_augment: list[str] = []
        # What a run of the method measured about itself (e.g. fip's gradient ratio), for the purify report.
        self.diagnostics: dict[str, float] = {}

    def batches(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> InfiniteBatches:
        """Endless shuffled batches of `batch_size` from the clean budget, augmented with
        `clean_augment`, both drawn from `seed`."""
        augment = augmenter(self.clean_augment, x.device, seed) if self.clean_augment else None
        return InfiniteBatches(x, y, int(self.params["batch_size"]), seed, augment=augment)

    def purify(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int,
               log: MetricLogger = _no_logging) -> nn.Module:
        """Return the purified model (possibly `model` itself, modified in place); set
        `self.tunable_parameters` to the number of values the defense optimised."""
        raise NotImplementedError

    def check(self) -> None:
        self.require(self.bn_stats in BN_MODES, "bn_stats", f"must be one of {list(BN_MODES)}")
        self.check_method()

    def check_method(self) -> None:
        """Reject bad hyper-parameters of the method; subclasses override."""

    def train_mode(self, model: nn.Module) -> nn.Module:
        """Training mode for purification, honouring `bn_stats`."""
        model.train()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if self.bn_stats == "frozen":
                    module.eval()
                elif self.bn_stats == "batch":
                    # momentum 0: normalise with batch statistics, leave the running ones untouched
                    module._purify_momentum = module.momentum
                    module.momentum = 0.0
        return model

    def finish(self, model: nn.Module) -> nn.Module:
        """Eval mode, with BatchNorm momenta restored after `train_mode`."""
        for module in model.modules():
            if hasattr(module, "_purify_momentum"):
                module.momentum = module._purify_momentum
                del module._purify_momentum
        return model.eval()

    def positive(self, *keys: str) -> None:
        for key in keys:
            self.require(float(self.params[key]) > 0, key, "must be positive")

    def non_negative(self, *keys: str) -> None:
        for key in keys:
            self.require(float(self.params[key]) >= 0, key, "must be ≥ 0")

    def positive_or_none(self, *keys: str) -> None:
        """For optional limits such as max_grad_norm: null switches them off."""
        for key in keys:
            value = self.params[key]
            self.require(value is None or float(value) > 0, key, "must be null (off) or positive")


def freeze_all_but(model: nn.Module, trainable: list[nn.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
