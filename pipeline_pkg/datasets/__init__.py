"""Datasets, one file each; importing this package registers them all."""

from . import (  # noqa: F401  (registration side effects)
    cifar10, digits, gtsrb, modelnet10, modelnet40, radioml2016, rf1024, shapes,
)
