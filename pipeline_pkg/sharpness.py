"""Sharpness of the loss surface on clean data: λ_max of the Hessian (power iteration on Hessian-vector
products) and Tr(H) (Hutchinson). FIP's premise is that backdoored models sit in sharper minima than
benign ones and purified models in smoother ones; the evaluate stage measures both so a benchmark can
check that premise per modality."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _loss_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    params: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, params, create_graph=True)


def _hvp(grads, params, vector) -> list[torch.Tensor]:
    dot = sum((g * v).sum() for g, v in zip(grads, vector))
    return [h.detach() for h in torch.autograd.grad(dot, params, retain_graph=True)]


def _dot(a, b) -> torch.Tensor:
    return sum((u * v).sum() for u, v in zip(a, b))


def sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, iterations: int = 20,
              probes: int = 20, seed: int = 0) -> dict[str, float]:
    """{"lambda_max": ..., "hessian_trace": ...} of the mean cross-entropy on (x, y), model in eval mode
    (running BatchNorm statistics), so the numbers depend on the weights alone."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    grads = _loss_gradients(model, x, y, params)

    vector = [torch.randn(p.shape, generator=gen).to(p.device) for p in params]
    norm = torch.sqrt(_dot(vector, vector))
    vector = [v / norm for v in vector]
    lambda_max = torch.tensor(0.0)
    for _ in range(iterations):
        hv = _hvp(grads, params, vector)
        lambda_max = _dot(vector, hv)
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:
            break
        vector = [h / norm for h in hv]

    trace = 0.0
    for _ in range(probes):
        probe = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype) for p in params]
        trace += float(_dot(probe, _hvp(grads, params, probe)))
    model.train(was_training)
    return {"lambda_max": float(lambda_max), "hessian_trace": trace / probes}
