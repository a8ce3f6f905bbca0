"""What every attack provides: a trigger applied to a batch on the device, and the poisoning of a
training set built on it (which samples, which labels), shared by all attacks."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..configurable import Configurable

MODES = ("all_to_one", "all_to_all")


class Attack(Configurable):
    kind = "attack"
    modalities: ClassVar[tuple[str, ...]] = ()
    # Clean-label attacks poison target-class samples only and never change a label.
    clean_label: ClassVar[bool] = False
    poison_defaults: ClassVar[dict[str, Any]] = {"rate": 0.1, "target": 0, "mode": "all_to_one"}
    trigger_defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = {**cls.poison_defaults, **cls.trigger_defaults}

    def check(self) -> None:
        self.require(0.0 <= float(self.rate) < 1.0, "rate", "must be in [0, 1)")
        self.require(self.mode in MODES, "mode", f"must be one of {list(MODES)}")
        self.require(int(self.target) >= 0, "target", "must be a class index ≥ 0")
        self.check_trigger()

    def check_trigger(self) -> None:
        """Reject bad trigger parameters; subclasses override."""

    def prepare(self, modality: str, attack_params: dict | None = None) -> "Attack":
        """Bind the attack to the dataset's modality (rejecting a trigger made for another modality);
        `attack_params` is the config's attacks section, for attacks built on another attack."""
        if modality not in self.modalities:
            raise ValueError(f"attack {self.name!r} works on {list(self.modalities)} data, "
                             f"not on {modality!r} data; choose an attack for this dataset")
        return self

    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> None:
        """Attacks with a learned trigger (a generator, an optimised pattern) train it here, inside the
        poison stage, on the training data they will poison; fixed triggers need nothing."""

    def state_arrays(self) -> dict[str, np.ndarray]:
        """A learned trigger's tensors, saved with the poisoned data so the trigger can be inspected
        and rebuilt; empty for fixed triggers."""
        return {}

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Return triggered copies of the batch `x` (same shape and dtype, same device)."""
        raise NotImplementedError

    def target_labels(self, y: np.ndarray, num_classes: int) -> np.ndarray:
        if self.mode == "all_to_all":
            return (y + 1) % num_classes
        if int(self.target) >= num_classes:
            raise ValueError(f"attack {self.name!r}: target class {self.target} does not exist "
                             f"(the dataset has {num_classes} classes)")
        return np.full_like(y, int(self.target))

    def attacked(self, y: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Boolean mask of the samples the backdoor is meant for: the pool a dirty-label attack poisons
        from and the test samples it triggers. Every sample whose label it changes, unless an attack
        narrows it (a source-class-specific attack keeps only its source classes)."""
        return targets != y

    def poison_count(self, n_samples: int) -> int:
        """How many of `n_samples` training samples to poison: round(rate × N), unless an attack sets an
        absolute number (then it also overrides poison_budget, which errors name)."""
        return int(round(float(self.rate) * n_samples))

    def poison_budget(self) -> tuple[str, Any]:
        """The parameter that sets poison_count, and its value."""
        return "rate", self.rate

    def trigger_numpy(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = [self.apply_trigger(torch.from_numpy(x[i:i + batch_size]).to(device)).cpu().numpy()
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else x.copy()

    def poison(self, x: np.ndarray, y: np.ndarray, num_classes: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Poison poison_count(N) samples (round(rate × N)); return (x, y, sorted poisoned indices)."""
        targets = self.target_labels(y, num_classes)
        pool = (targets == y) if self.clean_label else self.attacked(y, targets)
        eligible = np.flatnonzero(pool)
        n_poison = self.poison_count(len(y))
        if n_poison > len(eligible):
            key, value = self.poison_budget()
            raise ValueError(f"attack {self.name!r}: {key} {value} asks for {n_poison} poisoned samples "
                             f"but only {len(eligible)} are eligible; lower the {key}")
        idx = np.sort(rng.choice(eligible, size=n_poison, replace=False))
        x, y = x.copy(), y.copy()
        if n_poison:
            x[idx] = self.trigger_numpy(x[idx])
            if not self.clean_label:
                y[idx] = targets[idx]
        return x, y, idx

    def triggered_test(self, x: np.ndarray, y: np.ndarray,
                       num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Triggered copies of the test samples whose label the attack changes: (x, target, true)."""
        targets = self.target_labels(y, num_classes)
        keep = self.attacked(y, targets)
        return self.trigger_numpy(x[keep]), targets[keep], y[keep]
