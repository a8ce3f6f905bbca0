"""Architectures, one file each; importing this package registers them all."""

from . import conv5, rf_cnn  # noqa: F401  (registration side effects)
from .base import Classifier, ModelSpec, count_parameters  # noqa: F401
