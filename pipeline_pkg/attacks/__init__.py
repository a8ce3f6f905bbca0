"""Attacks, one file each; importing this package registers them all."""

from . import burst, none, phase  # noqa: F401  (registration side effects)
from .base import Attack  # noqa: F401
