"""The one evaluator: ACC, ASR, RA and DER from a model and a poison-stage file."""

from __future__ import annotations

import torch
from torch import nn

from .runtime import autocast


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    with autocast(x.device):
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(x) == 0:
        return float("nan")
    return float((predict(model, x) == y).float().mean())


def attack_metrics(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """ACC on the clean test set; ASR = share of triggered non-target samples classified as the target;
    RA = share of triggered samples classified as their true class."""
    bd_pred = predict(model, data["x_test_bd"]) if len(data["x_test_bd"]) else data["y_test_bd"][:0]
    n_bd = max(len(bd_pred), 1)
    return {
        "acc": accuracy(model, data["x_test"], data["y_test"]),
        "asr": float((bd_pred == data["y_test_bd"]).sum()) / n_bd,
        "ra": float((bd_pred == data["y_test_bd_true"]).sum()) / n_bd,
    }


def defense_effectiveness(before: dict[str, float], after: dict[str, float]) -> float:
    """DER = (max(0, ΔASR) − max(0, ΔACC) + 1) / 2, with Δ = undefended − defended."""
    d_asr = before["asr"] - after["asr"]
    d_acc = before["acc"] - after["acc"]
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1) / 2
