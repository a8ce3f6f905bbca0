"""Defenses, one file each; importing this package registers them all."""

from . import anp, fast_fip, fip, fp, ft, ftsam, ibau, nad, nft, ngf, none, rnp  # noqa: F401  (registration side effects)
from .base import Defense  # noqa: F401
