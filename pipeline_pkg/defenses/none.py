"""`none`: the undefended model, the row every defense is compared against."""

from ..registry import DEFENSES
from .base import Defense


@DEFENSES.register("none")
class NoDefense(Defense):
    def purify(self, model, x, y, *, seed, log=None):
        return model
