"""Attacks, one file each; importing this package registers them all."""

from . import badnets, blend, bpp, burst, ftrojan, inputaware, issba, lc, lira, none, phase, sig, trojan, wanet  # noqa: F401  (registration side effects)
from . import irba, pcba, pointba_i, pointba_o  # noqa: F401  (point-cloud attacks)
from .base import Attack  # noqa: F401
