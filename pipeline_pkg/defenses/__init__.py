"""Defenses, one file each; importing this package registers them all."""

from . import (  # noqa: F401  (registration side effects)
    anp, fast_fip, fip, fp, ft, ftsam, ibau, nad, nft, ngf, none, rnp, sor,
)
from .base import Defense  # noqa: F401
