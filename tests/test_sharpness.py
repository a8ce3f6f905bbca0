"""λ_max and Tr(H) against the exact Hessian of a small model, computed by brute force."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline_pkg.sharpness import sharpness


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        params = {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat)


def test_lambda_max_and_trace_match_the_exact_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.double), torch.randint(0, 3, (32,))
    hessian = exact_hessian(model, x, y)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    top = eigenvalues[eigenvalues.abs().argmax()].item()

    measured = sharpness(model, x, y, iterations=200, probes=4000, seed=0)
    assert measured["lambda_max"] == pytest.approx(top, rel=1e-3)
    assert measured["hessian_trace"] == pytest.approx(hessian.trace().item(), rel=0.1)


def test_sharper_model_measures_sharper_and_mode_is_restored():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    soft = sharpness(model, x, y, iterations=50, probes=50)
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # near-uniform softmax: curvature of CE in the weights is largest
    model.train()
    flat_logits = sharpness(model, x, y, iterations=50, probes=50)
    assert model.training
    assert flat_logits["lambda_max"] > soft["lambda_max"] > 0
