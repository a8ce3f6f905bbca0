"""Hyper-parameters with defaults, checked by name: the shared base of datasets, attacks, models and
defenses, so a typo in a config key fails with the list of valid keys instead of being ignored."""

from __future__ import annotations

import copy
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and what is allowed."""


class Configurable:
    name: ClassVar[str] = "?"  # set by the registry
    kind: ClassVar[str] = "component"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ConfigError(
                f"{self.kind} {self.name!r} has no parameter(s) {unknown}; "
                f"valid parameters: {sorted(self.defaults) or 'none'}")
        self.params: dict[str, Any] = {**copy.deepcopy(self.defaults), **params}
        self.check()

    def check(self) -> None:
        """Reject bad values with a ConfigError; subclasses override."""

    def require(self, condition: bool, key: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{self.kind} {self.name!r}: parameter {key}={self.params.get(key)!r} {message}")

    def __getattr__(self, key: str) -> Any:
        params = self.__dict__.get("params", {})
        if key in params:
            return params[key]
        raise AttributeError(key)
