"""Fisher-information pieces shared by the Fisher-guided defenses (fip, fast_fip, ngf).

They estimate the true Fisher E_x E_{y~p(·|x)} [∇ log p(y|x) ∇ log p(y|x)ᵀ], not the empirical Fisher of
the given labels: `fisher_trace_estimate` by projecting through the softmax, the others by labels drawn
from the model's own predictive distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sampled_log_likelihood(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(ŷ|x) per sample, with ŷ drawn from the model's softmax."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    y_hat = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
    return F.log_softmax(logits.float(), dim=1).gather(1, y_hat[:, None]).squeeze(1)


def rademacher_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, t.shape, generator=generator).to(t.device, t.dtype) * 2 - 1)


def fisher_trace_estimate(logits: torch.Tensor, params: list[torch.Tensor],
                          generator: torch.Generator, probes: int = 1) -> torch.Tensor:
    """A differentiable, unbiased estimate of Tr(F), the true Fisher's trace per sample, on a batch.

    With J_i the Jacobian of sample i's logits and p_i its softmax, Tr(F) = mean_i Tr(J_iᵀ M_i J_i),
    M = diag p − ppᵀ. M = A Aᵀ with A = diag √p − p √pᵀ (using Σp = 1), so for Rademacher u_i over the
    classes, E‖J_iᵀ A_i u_i‖² = Tr(J_iᵀ M_i J_i); independent u_i make the cross terms of
    ‖Σ_i J_iᵀ A_i u_i‖² vanish in expectation, so one vector-Jacobian product of the whole batch per probe
    estimates the sum. Every class enters weighted by √p, so no label is sampled: the earlier estimate
    squared the gradient of a label drawn from p, whose rare draws (∇log p ~10⁴ off the top class) decided
    whole steps. p is not detached, so the estimate's gradient is ∇Tr(F) through J and p alike (the
    vector-Jacobian product's vector stays in the graph)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    root = torch.exp(0.5 * log_probs)  # √p with a finite derivative where p underflows
    probs = root ** 2
    total = logits.new_zeros((), dtype=torch.float32)
    for _ in range(probes):
        u = rademacher_like(root, generator)
        vector = root * u - probs * (root * u).sum(dim=1, keepdim=True)
        grads = torch.autograd.grad(logits, params, grad_outputs=vector.to(logits.dtype), create_graph=True)
        total = total + sum((g.float() ** 2).sum() for g in grads)
    return total / (probes * len(logits))


def diagonal_fisher(model: nn.Module, x: torch.Tensor, params: list[torch.Tensor],
                    generator: torch.Generator, chunk: int = 64) -> list[torch.Tensor]:
    """Per-parameter diagonal of the Fisher, mean over samples of squared per-sample gradients.

    Computed once, with the model in eval mode so one sample's gradient does not depend on the others
    through batch statistics."""
    was_training = model.training
    model.eval()
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, len(x), chunk):
        xb = x[start:start + chunk]
        log_lik = sampled_log_likelihood(model(xb), generator)
        for i in range(len(xb)):
            grads = torch.autograd.grad(log_lik[i], params, retain_graph=i < len(xb) - 1)
            for acc, g in zip(total, grads):
                acc += g.detach() ** 2
    model.train(was_training)
    return [t / len(x) for t in total]


def retention_penalty(params: list[torch.Tensor], anchors: list[torch.Tensor],
                      fisher: list[torch.Tensor]) -> torch.Tensor:
    """Σ_j F_j(θ₀)(θ_j − θ₀,j)²: keeps the weights that matter for clean data near their start."""
    return sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fisher))
