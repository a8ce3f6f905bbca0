"""One registry per concept: datasets, attacks, models and defenses are looked up by name here.

Each implementation lives in its own file, named after it, and registers itself with a decorator;
importing the concept's package imports every file, so the registry is complete once imported.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A config or command line named something that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str):
        self.kind = kind
        self._package = package
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            setattr(obj, "name", name)
            return obj

        return decorator

    def _load(self) -> None:
        # Importing the package runs every implementation file's @register.
        import importlib

        importlib.import_module(self._package)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid {self.kind} names: {', '.join(self.names())}"
            ) from None


DATASETS: Registry = Registry("dataset", "pipeline_pkg.datasets")
ATTACKS: Registry = Registry("attack", "pipeline_pkg.attacks")
MODELS: Registry = Registry("arch", "pipeline_pkg.models")
DEFENSES: Registry = Registry("defense", "pipeline_pkg.defenses")
DETECTORS: Registry = Registry("detector", "pipeline_pkg.detectors")

REGISTRIES = {"dataset": DATASETS, "attack": ATTACKS, "arch": MODELS, "defense": DEFENSES,
              "detector": DETECTORS}
