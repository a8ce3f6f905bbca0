"""Poisoned-sample detectors, one file each; importing this package registers them all."""

from . import activation_clustering, spectral, strongest_feature  # noqa: F401  (registration side effects)
from .base import Detector, detection_metrics, penultimate_features  # noqa: F401
