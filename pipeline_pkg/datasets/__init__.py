"""Datasets, one file each; importing this package registers them all."""

from . import cifar10, digits, gtsrb, radioml2016, rf1024  # noqa: F401  (registration side effects)
