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


def spectral_scores(features: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
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
        scores[members] = (centred @ vh[0]) ** 2
    return scores.cpu().numpy()


@DETECTORS.register("spectral")
class SpectralSignatures(Detector):
    method_defaults = {"batch_size": 256}  # for the feature pass only

    def check_method(self) -> None:
        self.positive("batch_size")

    def scores(self, models, x, y, *, seed):
        self.check_inputs(models, x, y)
        # The paper uses the trained (final) network's representation.
        features = penultimate_features(models[-1], x, int(self.batch_size))
        return spectral_scores(features, y)
