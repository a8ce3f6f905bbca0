"""What every poisoned-sample detector provides: trained checkpoints and the (possibly poisoned) training set
in, one suspicion score per training sample out; the top `flag_rate` share is flagged for removal.

Detectors see models only through the `features` / `classifier` split every architecture has, so each works
on images, RF frames and point clouds unchanged. How many samples to flag is a user's guess at the poison
rate, never derived from which samples really are poisoned: that ground truth only enters
`detection_metrics`, which scores the flags afterwards."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..configurable import Configurable
from ..models.base import Classifier


class Detector(Configurable):
    kind = "detector"
    # flag_rate 0.15: 1.5 × the 10% poison rate a user expects, the margin Tran et al. (2018) and later
    # papers remove, so that detection does not hinge on guessing the poison rate exactly.
    common_defaults: ClassVar[dict] = {"flag_rate": 0.15}
    method_defaults: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = {**cls.common_defaults, **cls.method_defaults}

    def scores(self, models: list[Classifier], x: torch.Tensor, y: torch.Tensor, *, seed: int) -> np.ndarray:
        """One suspicion score per training sample (higher = more likely poisoned). `models` are checkpoints
        of the trained model, the final one last; x and y lie on the models' device, as the models take
        them (uint8 images, float RF frames, float point clouds)."""
        raise NotImplementedError

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """Sorted indices of the round(flag_rate × N) highest scores; equal scores go to the lower index,
        so the same scores always flag the same samples."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if np.isnan(scores).any():
            raise ValueError(f"detector {self.name!r} produced NaN scores for "
                             f"{int(np.isnan(scores).sum())} samples; nothing can be flagged from them")
        count = round(float(self.flag_rate) * len(scores))
        # lexsort sorts by the last key first: descending score, then ascending index.
        order = np.lexsort((np.arange(len(scores)), -scores))
        return np.sort(order[:count]).astype(np.int64)

    def check(self) -> None:
        self.require(0 <= float(self.flag_rate) < 1, "flag_rate", "must be in [0, 1): the share of the "
                     "training set to flag")
        self.check_method()

    def check_method(self) -> None:
        """Reject bad hyper-parameters of the method; subclasses override."""

    def positive(self, *keys: str) -> None:
        for key in keys:
            self.require(float(self.params[key]) > 0, key, "must be positive")

    @staticmethod
    def check_inputs(models: list[Classifier], x: torch.Tensor, y: torch.Tensor) -> None:
        if not models:
            raise ValueError("a detector needs at least one trained model; got an empty list")
        if len(x) != len(y):
            raise ValueError(f"the training set has {len(x)} inputs but {len(y)} labels")


def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """model.features(x) in eval mode without gradients, batch by batch: the representation the final
    Linear layer classifies, as float32 (N, D) on the input's device. The model's mode is restored."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            out.append(model.features(x[start:start + batch_size]).float().flatten(1))
    model.train(was_training)
    return torch.cat(out)


def detection_metrics(scores: np.ndarray, flagged: np.ndarray, poisoned_idx: np.ndarray, n: int) -> dict:
    """How well the flags and scores match the truly poisoned samples: TPR (share of poisoned samples
    flagged), FPR (share of clean samples flagged), AUROC of the scores (NaN when all samples are poisoned
    or none is), and the flagged and poisoned counts."""
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != n:
        raise ValueError(f"detection_metrics got {len(scores)} scores for a training set of {n} samples")
    is_poisoned = np.zeros(n, dtype=bool)
    is_poisoned[np.asarray(poisoned_idx, dtype=np.int64)] = True
    is_flagged = np.zeros(n, dtype=bool)
    is_flagged[np.asarray(flagged, dtype=np.int64)] = True
    poisoned, clean = int(is_poisoned.sum()), int(n - is_poisoned.sum())
    return {
        "tpr": float((is_flagged & is_poisoned).sum() / poisoned) if poisoned else math.nan,
        "fpr": float((is_flagged & ~is_poisoned).sum() / clean) if clean else math.nan,
        "auroc": float(roc_auc_score(is_poisoned, scores)) if poisoned and clean else math.nan,
        "flagged": int(is_flagged.sum()),
        "poisoned": poisoned,
    }
