"""The evaluator: DER on hand-computed cases; ACC/ASR/RA from a model whose predictions are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline_pkg.evaluator import accuracy, attack_metrics, defense_effectiveness, predict

torch.set_num_threads(1)

C = 4


class Lookup(nn.Module):
    """Predicts the class stored in the input's first element (one-hot logits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0].long(), C).float()


def inputs(classes: list[int]) -> torch.Tensor:
    x = torch.randn(len(classes), 3, generator=torch.Generator().manual_seed(len(classes)))
    x[:, 0] = torch.tensor(classes, dtype=torch.float32)
    return x


@pytest.mark.parametrize("before, after, expected", [
    ({"acc": 0.9, "asr": 1.0}, {"acc": 0.85, "asr": 0.05}, 0.95),   # (0.95 - 0.05 + 1) / 2
    ({"acc": 0.9, "asr": 1.0}, {"acc": 0.9, "asr": 0.0}, 1.0),      # perfect defense
    ({"acc": 1.0, "asr": 0.5}, {"acc": 0.0, "asr": 0.5}, 0.0),      # worst case
    ({"acc": 0.9, "asr": 0.2}, {"acc": 0.9, "asr": 0.5}, 0.5),      # ASR rises: no credit, no penalty
    ({"acc": 0.9, "asr": 0.2}, {"acc": 0.8, "asr": 0.5}, 0.45),     # ASR rises and ACC drops
    ({"acc": 0.8, "asr": 0.9}, {"acc": 0.9, "asr": 0.1}, 0.9),      # ACC rises: no bonus
    ({"acc": 0.7, "asr": 0.9}, {"acc": 0.7, "asr": 0.9}, 0.5),      # nothing changes
])
def test_defense_effectiveness(before, after, expected):
    assert defense_effectiveness(before, after) == pytest.approx(expected, abs=1e-12)


def test_predict_batches_in_order_and_sets_eval():
    model = nn.Sequential(Lookup()).train()
    classes = [3, 1, 0, 2, 2, 1, 0]
    pred = predict(model, inputs(classes), batch_size=3)
    assert pred.tolist() == classes
    assert not model.training


def test_accuracy():
    x = inputs([0, 1, 2, 3, 1])
    assert accuracy(Lookup(), x, torch.tensor([0, 1, 2, 0, 0])) == pytest.approx(0.6)
    assert math.isnan(accuracy(Lookup(), x[:0], torch.tensor([], dtype=torch.long)))


def test_attack_metrics_exact():
    data = {
        "x_test": inputs([0, 1, 2, 3, 1]),
        "y_test": torch.tensor([0, 1, 2, 0, 0]),              # 3 of 5 correct
        "x_test_bd": inputs([2, 2, 1, 0, 2, 3]),
        "y_test_bd": torch.tensor([2, 2, 2, 2, 2, 2]),         # 3 of 6 hit the target
        "y_test_bd_true": torch.tensor([0, 1, 1, 3, 3, 3]),    # 2 of 6 keep their true class
    }
    metrics = attack_metrics(Lookup(), data)
    assert metrics["acc"] == pytest.approx(3 / 5)
    assert metrics["asr"] == pytest.approx(3 / 6)
    assert metrics["ra"] == pytest.approx(2 / 6)


def test_attack_metrics_all_to_all_targets():
    # Per-sample targets (all_to_all): ASR compares with each sample's own target.
    data = {
        "x_test": inputs([1, 2]),
        "y_test": torch.tensor([1, 2]),
        "x_test_bd": inputs([1, 2, 3, 3]),
        "y_test_bd": torch.tensor([1, 3, 3, 0]),
        "y_test_bd_true": torch.tensor([0, 2, 2, 3]),
    }
    metrics = attack_metrics(Lookup(), data)
    assert metrics == pytest.approx({"acc": 1.0, "asr": 0.5, "ra": 0.5})
