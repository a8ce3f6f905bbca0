"""Fisher-information pieces: the Hutchinson trace estimate is unbiased for the true Fisher trace and
differentiable; the diagonal Fisher matches brute force; the retention penalty is Σ F Δ²."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline_pkg.defenses.fisher import (
    diagonal_fisher,
    fisher_trace_estimate,
    retention_penalty,
    sampled_log_likelihood,
)

torch.set_num_threads(1)

N_CLASSES = 3


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, N_CLASSES))


def tiny_inputs(seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(6, 5, generator=torch.Generator().manual_seed(seed))


def per_sample_grads(model: nn.Module, x: torch.Tensor, params, i: int, c: int) -> list[torch.Tensor]:
    log_p = F.log_softmax(model(x[i:i + 1]), dim=1)[0, c]
    return [g.detach() for g in torch.autograd.grad(log_p, params)]


def exact_fisher(model: nn.Module, x: torch.Tensor, params) -> tuple[float, list[torch.Tensor]]:
    """Brute force: E_i Σ_y p(y|x_i) ∇log p(y|x_i)² — the trace and the diagonal."""
    diag = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    for i in range(len(x)):
        for c in range(N_CLASSES):
            for d, g in zip(diag, per_sample_grads(model, x, params, i, c)):
                d += probs[i, c] * g ** 2
    diag = [d / len(x) for d in diag]
    return float(sum(d.sum() for d in diag)), diag


def test_trace_estimate_is_unbiased():
    """The mean of single-probe estimates matches the exact trace, enumerated over classes, within 5%
    (1,500 draws of a relative spread ~0.5: the mean's own error is ~1.3%)."""
    model, x = tiny_model(), tiny_inputs()
    params = list(model.parameters())
    exact, _ = exact_fisher(model, x, params)
    assert exact > 0
    gen = torch.Generator().manual_seed(123)
    draws = torch.tensor([float(fisher_trace_estimate(model(x), params, gen, probes=1).detach())
                          for _ in range(1500)])
    assert torch.all(draws >= 0), "a sum of squares"
    assert float(draws.mean()) == pytest.approx(exact, rel=0.05)


def test_trace_estimate_more_probes_same_mean_less_spread():
    model, x = tiny_model(2), tiny_inputs(3)
    params = list(model.parameters())
    exact, _ = exact_fisher(model, x, params)
    gen = torch.Generator().manual_seed(5)
    few = torch.tensor([float(fisher_trace_estimate(model(x), params, gen, probes=1).detach())
                        for _ in range(300)])
    many = torch.tensor([float(fisher_trace_estimate(model(x), params, gen, probes=4).detach())
                         for _ in range(300)])
    assert float(many.mean()) == pytest.approx(exact, rel=0.1)
    assert float(many.std()) < 0.7 * float(few.std())  # ~1/√4 in theory


def test_trace_estimate_has_no_heavy_tail_on_a_confident_model():
    """A model sure of its top class: squaring ∇log p of a label drawn from p (the earlier estimate) lets a
    rare draw, ~10⁴× the typical one, decide the value, so its draws range over orders of magnitude.
    Projected through the softmax, every draw stays within a small factor of the exact trace."""
    model, x = tiny_model(4), tiny_inputs(5)
    with torch.no_grad():
        model[2].weight.mul_(60)
    params = list(model.parameters())
    exact, _ = exact_fisher(model, x, params)
    with torch.no_grad():
        assert float(torch.softmax(model(x), 1).max(1).values.min()) > 0.9, "the premise: a confident model"
    gen = torch.Generator().manual_seed(6)
    draws = torch.tensor([float(fisher_trace_estimate(model(x), params, gen, probes=1).detach())
                          for _ in range(300)])
    assert float(draws.mean()) == pytest.approx(exact, rel=0.1)
    assert float(draws.max()) < 3 * exact
    sampled = []  # the sampled-label estimate: same mean, but its typical draw is far below it
    for _ in range(300):
        grads = torch.autograd.grad(sampled_log_likelihood(model(x), gen).sum(), params)
        sampled.append(float(sum((g ** 2).sum() for g in grads)) / len(x))
    sampled = torch.tensor(sampled)
    assert float(sampled.max()) > 10 * exact and float(sampled.median()) < 0.2 * exact


def test_trace_estimate_gradient_is_unbiased():
    """E[∇ estimate] = ∇Tr(F): the softmax weights stay in the graph, so the gradient also follows p."""
    model, x = tiny_model(6), tiny_inputs(7)
    params = list(model.parameters())

    def exact_trace() -> torch.Tensor:
        probs = torch.softmax(model(x), dim=1)
        total = 0.0
        for i in range(len(x)):
            for c in range(N_CLASSES):
                log_p = F.log_softmax(model(x[i:i + 1]), dim=1)[0, c]
                grads = torch.autograd.grad(log_p, params, create_graph=True)
                total = total + probs[i, c] * sum((g ** 2).sum() for g in grads)
        return total / len(x)

    exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact_trace(), params)])
    gen = torch.Generator().manual_seed(8)
    mean = torch.zeros_like(exact)
    draws = 800
    for _ in range(draws):
        grads = torch.autograd.grad(fisher_trace_estimate(model(x), params, gen, probes=1), params)
        mean += torch.cat([g.flatten() for g in grads]) / draws
    assert float((mean - exact).norm() / exact.norm()) < 0.1
    # Without the softmax's own derivative (p detached) the gradient would miss that part.
    assert float(torch.nn.functional.cosine_similarity(mean, exact, dim=0)) > 0.99


def test_trace_estimate_is_differentiable():
    model, x = tiny_model(), tiny_inputs()
    params = list(model.parameters())
    trace = fisher_trace_estimate(model(x), params, torch.Generator().manual_seed(0), probes=4)
    assert trace.requires_grad and trace.dim() == 0
    trace.backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(float(p.grad.abs().sum()) > 0 for p in params)


def test_trace_estimate_reproducible_from_generator():
    model, x = tiny_model(), tiny_inputs()
    params = list(model.parameters())
    a = fisher_trace_estimate(model(x), params, torch.Generator().manual_seed(9), probes=4)
    b = fisher_trace_estimate(model(x), params, torch.Generator().manual_seed(9), probes=4)
    assert torch.equal(a, b)


def test_sampled_log_likelihood_draws_from_softmax():
    # Logits that make class 2 certain: every draw is class 2, log p ≈ 0.
    logits = torch.tensor([[-30.0, -30.0, 30.0]] * 4, requires_grad=True)
    ll = sampled_log_likelihood(logits, torch.Generator().manual_seed(0))
    assert ll.shape == (4,)
    torch.testing.assert_close(ll, F.log_softmax(logits, 1)[:, 2])
    # Roughly p-weighted frequencies for a non-degenerate distribution.
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]])).expand(4000, 3)
    ll = sampled_log_likelihood(logits, torch.Generator().manual_seed(1))
    freq = torch.stack([(ll - float(torch.log(torch.tensor(p)))).abs().lt(1e-5).float().mean()
                        for p in (0.2, 0.3, 0.5)])
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.3, 0.5]), atol=0.03, rtol=0)


def test_diagonal_fisher_matches_brute_force_for_the_drawn_labels():
    model, x = tiny_model(), tiny_inputs()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(4)
    replay = torch.Generator()
    replay.set_state(gen.get_state())
    fisher = diagonal_fisher(model, x, params, gen)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    labels = torch.multinomial(probs, 1, generator=replay).squeeze(1)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        for e, g in zip(expected, per_sample_grads(model, x, params, i, int(labels[i]))):
            e += g ** 2 / len(x)
    assert len(fisher) == len(params)
    for f, e, p in zip(fisher, expected, params):
        assert f.shape == p.shape
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-7)


def test_diagonal_fisher_expectation_is_true_fisher():
    model, x = tiny_model(), tiny_inputs()
    params = list(model.parameters())
    _, exact = exact_fisher(model, x, params)
    runs = [diagonal_fisher(model, x, params, torch.Generator().manual_seed(s), chunk=4) for s in range(300)]
    mean = [torch.stack([r[k] for r in runs]).mean(0) for k in range(len(params))]
    err = sum(float(((m - e) ** 2).sum()) for m, e in zip(mean, exact)) ** 0.5
    norm = sum(float((e ** 2).sum()) for e in exact) ** 0.5
    assert err / norm < 0.1


def test_diagonal_fisher_uses_eval_mode_and_restores_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, N_CLASSES))
    model.train()
    x = tiny_inputs()
    params = list(model.parameters())
    bn = model[1]
    mean_before, batches_before = bn.running_mean.clone(), int(bn.num_batches_tracked)
    # Per-sample gradients in eval mode do not depend on the other samples of the chunk.
    a = diagonal_fisher(model, x, params, torch.Generator().manual_seed(0), chunk=64)
    assert model.training, "the training flag is restored"
    assert torch.equal(bn.running_mean, mean_before) and int(bn.num_batches_tracked) == batches_before
    gen = torch.Generator().manual_seed(0)
    replay = torch.Generator()
    replay.set_state(gen.get_state())
    model.eval()
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(model(x), 1), 1, generator=replay).squeeze(1)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        for e, g in zip(expected, per_sample_grads(model, x, params, i, int(labels[i]))):
            e += g ** 2 / len(x)
    for f, e in zip(a, expected):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-7)
    model.eval()
    diagonal_fisher(model, x, params, torch.Generator().manual_seed(0))
    assert not model.training


def test_retention_penalty():
    model = tiny_model()
    params = list(model.parameters())
    anchors = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    fisher = [torch.rand(p.shape, generator=gen) for p in params]
    assert float(retention_penalty(params, anchors, fisher).detach()) == 0.0
    deltas = [0.1 * torch.randn(p.shape, generator=gen) for p in params]
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p += d
    expected = sum(float((f.double() * d.double() ** 2).sum()) for f, d in zip(fisher, deltas))
    penalty = retention_penalty(params, anchors, fisher)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-4)
    penalty.backward()
    for p, f, d in zip(params, fisher, deltas):  # ∂/∂θ = 2 F Δ
        torch.testing.assert_close(p.grad, 2 * f * d, rtol=1e-3, atol=1e-6)
