"""Load dataset pickles without letting them run code.

Pickles published with datasets (RadioML's dict of frames, CIFAR-10's batches) hold only plain
containers, strings and numpy arrays, so the unpickler admits exactly the globals those need and
refuses every other one: a pickle from a tampered archive cannot import and call arbitrary functions.
"""

from __future__ import annotations

import importlib
import pickle
from typing import IO, Any

# Everything a pickled container of numpy arrays refers to; dicts, lists, tuples, numbers and strings
# need no global at all. numpy 2 renamed numpy.core to numpy._core; Python 2 pickles name the old one.
# _codecs.encode is how Python 3 pickles bytes at protocol 2; it only converts text to bytes.
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the allowed set (it may be crafted to run code)."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise ForbiddenGlobalError(
                f"refusing to load global {module}.{name} from a dataset pickle: only plain "
                f"containers, strings and numpy arrays are allowed, and this name could run arbitrary code")
        if module.startswith("numpy.core."):
            # Resolve the renamed module directly rather than through numpy's deprecation shim.
            module = "numpy._core." + module[len("numpy.core."):]
        return getattr(importlib.import_module(module), name)


def restricted_load(fileobj: IO[bytes]) -> Any:
    """Unpickle plain containers, strings and numpy arrays only; any other global raises
    ForbiddenGlobalError (an UnpicklingError).

    `encoding="latin1"` turns Python 2 byte strings into str losslessly, which numpy accepts as raw
    array data.
    """
    return _NumpyOnlyUnpickler(fileobj, encoding="latin1").load()
