"""The benign reference: nothing is poisoned. Its triggered test set uses a probe trigger (by default
the modality's first attack) so the benign model's ASR shows what rate is reached without a backdoor."""

from __future__ import annotations

import numpy as np
import torch

from ..registry import ATTACKS
from .base import Attack

DEFAULT_PROBE = {"rf": "burst", "image": "badnets", "pointcloud": "pointba_i"}


@ATTACKS.register("none")
class NoAttack(Attack):
    modalities = ("rf", "image", "pointcloud")
    poison_defaults = {"rate": 0.0, "target": 0, "mode": "all_to_one"}
    trigger_defaults = {"probe": None}

    def check_trigger(self) -> None:
        self.require(float(self.rate) == 0.0, "rate", "must be 0 for the benign reference")
        self.require(self.probe != "none", "probe", "must name an attack whose trigger probes the model")
        self._probe: Attack | None = None

    def prepare(self, modality: str, attack_params: dict | None = None) -> Attack:
        super().prepare(modality)
        probe = self.probe or DEFAULT_PROBE.get(modality)
        if probe is None:
            raise ValueError(f"attack 'none': no default probe trigger for {modality!r} data; "
                             f"set attacks.none.probe to an attack name")
        # The probe is the configured trigger (same geometry as the attack run beside it), aimed at
        # this reference's target.
        probe_params = {**(attack_params or {}).get(probe, {}), "target": self.target, "mode": self.mode}
        self._probe = ATTACKS.get(probe)(**probe_params).prepare(modality, attack_params)
        return self

    def probe_attack(self) -> Attack:
        if self._probe is None:
            raise RuntimeError("attack 'none' must be prepared with the dataset's modality first")
        return self._probe

    # A learned probe trigger (e.g. lira) is fitted and saved exactly as the attack itself would be.
    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int) -> None:
        self.probe_attack().fit(x, y, num_classes, seed)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return self.probe_attack().state_arrays()

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe_attack().apply_trigger(x)
