"""Small models and clean budgets shared by the defense tests (CPU, fixed seeds)."""

import torch
from torch import nn

from pipeline_pkg.models.rf_cnn import RFCNNSpec


def with_running_stats(model: nn.Module, length: int) -> nn.Module:
    """Non-default BatchNorm running statistics, as a trained model would have."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 2, length) * 2 + 0.5)
    return model.eval()


def tiny_rf_cnn(length: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    return with_running_stats(RFCNNSpec(width=4, hidden=8).build([2, length], classes), length)


def clean_budget(length: int, classes: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, length, generator=gen), torch.arange(n) % classes
