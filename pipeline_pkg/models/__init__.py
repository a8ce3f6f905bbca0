"""Architectures, one file each; importing this package registers them all."""

from . import conv5, dgcnn, pointnet, preact_resnet18, resnet9, rf_cnn, vit  # noqa: F401  (registration side effects)
from .base import Classifier, ModelSpec, count_parameters  # noqa: F401
