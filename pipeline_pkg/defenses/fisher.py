"""Fisher-information pieces shared by the Fisher-guided defenses (fip, fast_fip, ngf).

Labels are drawn from the model's own predictive distribution, so these estimate the true Fisher
E_x E_{y~p(·|x)} [∇ log p(y|x) ∇ log p(y|x)ᵀ], not the empirical Fisher of the given labels."""

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
                          generator: torch.Generator, probes: int = 8) -> torch.Tensor:
    """A differentiable, unbiased estimate of Tr(F) = E‖∇_θ log p(y|x)‖² on a batch, from its logits.

    Hutchinson's estimator: for Rademacher v, E_v[(vᵀg)²] = ‖g‖². Random signs r_i on the per-sample
    log-likelihoods give E_r[(Σ_i r_i vᵀg_i)²] = Σ_i (vᵀg_i)², so one backward pass (kept in the graph)
    estimates the per-sample mean — the projection is squared, as the trace requires. A single probe
    varies over three orders of magnitude; averaging `probes` projections of the same gradient costs
    almost nothing more, since they share one graph."""
    log_lik = sampled_log_likelihood(logits, generator)
    signs = rademacher_like(log_lik, generator)
    grads = torch.autograd.grad((signs * log_lik).sum(), params, create_graph=True)
    total = logits.new_zeros(())
    for _ in range(probes):
        projection = sum((rademacher_like(g, generator) * g).sum() for g in grads)
        total = total + projection ** 2
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
