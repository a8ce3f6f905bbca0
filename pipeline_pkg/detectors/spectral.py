"""`spectral`: spectral signatures (Tran, Li and Madry, NeurIPS 2018).

Poisoned samples relabelled into a class carry a feature (the trigger) that clean samples of that class
lack, so within the class they shift the learned representation along one direction, which the top
singular vector of the class's centred representations picks up. A sample's outlier score is its squared
projection on that vector. The paper removes the top 1.5ε share per class; here the scores of all classes
are ranked together by `flag`, so a class whose top direction carries a large spread (the poisoned class)
contributes most of the flags."""

from __future__ import annotations

import numpy as np
import torch

from ..registry import DETECTORS
from .base import Detector, penultimate_features


def spectral_scores(features: torch.Tensor, labels: torch.Tensor, one_sided: bool = True) -> np.ndarray:
    """Per class (by the given label): centre the class's representations, take the top right singular
    vector v, score every sample of the class by ((r − mean) · v)². Classes with one sample score 0."""
    features = features.double()
    scores = torch.zeros(len(features), dtype=torch.float64, device=features.device)
    for label in torch.unique(labels):
        members = (labels == label).nonzero().flatten()
        if len(members) < 2:
            continue
        centred = features[members] - features[members].mean(0, keepdim=True)
        # The top right singular vector of the centred matrix: the direction of largest spread.
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projection = centred @ vh[0]
        if one_sided:
            # The poisoned samples are the class's minority, so they form the long tail of the projection:
            # the side its skewness points to. The clean majority sits on the other side, close to the
            # mean; squaring would rank its far end alongside the poison.
            projection = projection * torch.sign((projection ** 3).sum())
            projection = projection.clamp(min=0)
        scores[members] = projection ** 2
    return scores.cpu().numpy()


@DETECTORS.register("spectral")
class SpectralSignatures(Detector):
    method_defaults = {"batch_size": 256, "one_sided": True}  # for the feature pass only

    def check_method(self) -> None:
        self.positive("batch_size")
        self.require(isinstance(self.one_sided, bool), "one_sided", "must be true or false")

    def scores(self, models, x, y, *, seed):
        self.check_inputs(models, x, y)
        # The paper uses the trained (final) network's representation.
        features = penultimate_features(models[-1], x, int(self.batch_size))
        return spectral_scores(features, y, bool(self.one_sided))
