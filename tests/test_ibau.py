"""I-BAU: the universal inner maximisation, the implicit hypergradient against finite differences of
the solved inner problem, the defense's contract, and its effect on a backdoored RF model."""

import time

import pytest
import torch
from torch import nn

import pipeline_pkg.defenses.ibau  # noqa: F401  (registers "ibau")
from pipeline_pkg import stages
from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.defenses.ibau import (data_norm, implicit_hypergradient, inner_objective,
                                        maximize_perturbation)
from pipeline_pkg.evaluator import attack_metrics
from pipeline_pkg.registry import DEFENSES


def conv_model(shape):
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if len(shape) == 2 else (nn.Conv2d, nn.BatchNorm2d)
    pool = nn.AdaptiveAvgPool1d(1) if len(shape) == 2 else nn.AdaptiveAvgPool2d(1)
    model = nn.Sequential(conv(shape[0], 8, 3, padding=1), bn(8), nn.ReLU(), pool, nn.Flatten())
    return nn.Sequential(model, nn.Linear(8, 4))


@pytest.mark.parametrize("shape", [(2, 32), (3, 8, 8)])
def test_inner_maximisation_raises_the_loss_inside_the_ball(shape):
    torch.manual_seed(0)
    model = conv_model(shape).train()  # train mode: BN would update its running stats if allowed to
    x, y = torch.randn(16, *shape), torch.randint(0, 4, (16,))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    radius = 0.3 * data_norm(x)
    delta = maximize_perturbation(model, x, y, None, radius, steps=5, lr=0.5)
    assert delta.shape == x.shape[1:]
    assert delta.norm() <= radius * (1 + 1e-5)
    # neither weights nor BatchNorm running statistics moved; the weights' grad flags are restored
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key
    assert all(p.requires_grad for p in model.parameters())
    zero = torch.zeros_like(delta)
    assert inner_objective(model, x, y, delta, 0.0) > inner_objective(model, x, y, zero, 0.0) + 0.01
    # a warm start from outside the ball is projected onto it first
    again = maximize_perturbation(model, x, y, 10 * radius * delta / delta.norm(), radius, steps=1, lr=0.5)
    assert again.norm() <= radius * (1 + 1e-5)


def concave_problem():
    """A linear classifier whose inner problem max_δ CE(W(x+δ)+b, y) − (λ/2)‖δ‖² is strongly concave
    (λ above the largest curvature of the CE term), so δ*(θ) is an interior maximiser, smooth in θ."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    reg = 2.0 * torch.linalg.matrix_norm(model.weight.detach(), 2).item() ** 2
    return model, x, y, reg


def solve_inner(model, x, y, reg):
    """δ*(θ) to machine precision by Newton's method."""
    delta = torch.zeros(x.shape[1], dtype=torch.float64)
    objective = lambda d: inner_objective(model, x, y, d, reg)  # noqa: E731
    with torch.enable_grad():  # also when called from a no_grad block
        for _ in range(30):
            d = delta.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(d), d)
            hessian = torch.autograd.functional.hessian(objective, delta)
            delta = delta - torch.linalg.solve(hessian, grad.detach())
    return delta.detach()


def outer_loss(model, x, y):
    return lambda d: nn.functional.cross_entropy(model(x + d), y) + nn.functional.cross_entropy(model(x), y)


def test_implicit_hypergradient_matches_finite_differences():
    model, x, y, reg = concave_problem()
    params = list(model.parameters())
    inner = lambda d: inner_objective(model, x, y, d, reg)  # noqa: E731
    delta = solve_inner(model, x, y, reg)

    # brute force: dL_outer(θ, δ*(θ))/dθ by central differences, re-solving the inner problem each time
    h = 1e-6
    brute = []
    with torch.no_grad():
        for p in params:
            column = torch.zeros_like(p)
            for i in range(p.numel()):
                values = []
                for sign in (1, -1):
                    p.view(-1)[i] += sign * h
                    values.append(outer_loss(model, x, y)(solve_inner(model, x, y, reg)).item())
                    p.view(-1)[i] -= sign * h
                column.view(-1)[i] = (values[0] - values[1]) / (2 * h)
            brute.append(column)
    brute = torch.cat([b.flatten() for b in brute])

    # the Neumann series contracts with ρ = ‖I + αH‖ (H = ∂²_{δδ}G, negative definite)
    hessian = torch.autograd.functional.hessian(inner, delta)
    alpha = 1.0 / torch.linalg.eigvalsh(-hessian).max().item()
    rho = torch.linalg.matrix_norm(torch.eye(4, dtype=torch.float64) + alpha * hessian, 2).item()
    assert rho < 1

    def hypergradient(steps):
        _, grads = implicit_hypergradient(outer_loss(model, x, y), inner, delta, params, steps, alpha)
        return torch.cat([g.flatten() for g in grads])

    partial = hypergradient(0)  # ∂_θ L_outer alone: what the alternating min-max uses
    correction = (brute - partial).norm()
    assert correction > 1e-3 * brute.norm()  # the implicit term matters on this problem
    converged = hypergradient(200)
    assert torch.allclose(converged, brute, rtol=1e-5, atol=1e-7)
    # Truncated after K terms the series misses (∂_θΦ)ᵀ J^K v (J = ∂_δΦ, v = the infinite sum
    # −(αH)⁻¹ ∂_δL_outer): the error is at most ‖∂_θΦ‖·ρ^K·‖v‖.
    d = delta.clone().requires_grad_(True)
    (ascent,) = torch.autograd.grad(inner(d), d, create_graph=True)
    rows = [torch.autograd.grad(alpha * a, params, retain_graph=True) for a in ascent]
    cross = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])  # ∂_θΦ: δ × θ entries
    (g_delta,) = torch.autograd.grad(outer_loss(model, x, y)(d), d)
    v = torch.linalg.solve(-alpha * hessian, g_delta)
    assert torch.allclose(converged, partial + cross.T @ v, atol=1e-8)
    for steps in (1, 3, 5):
        error = (hypergradient(steps) - brute).norm()
        bound = torch.linalg.matrix_norm(cross, 2) * rho ** steps * v.norm()
        print(f"Neumann K={steps}: error {error:.2e} (bound {bound:.2e}), implicit term {correction:.2e}")
        assert error <= bound + 1e-7
    assert (hypergradient(5) - brute).norm() < (partial - brute).norm()


def tiny_rf_like():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(24, 2, 32), torch.randint(0, 3, (24,))
    return model, x, y


@pytest.mark.parametrize("hypergradient", [True, False])
def test_deterministic_plain_state_dict_eval_mode(hypergradient):
    states = []
    for _ in range(2):
        model, x, y = tiny_rf_like()
        keys = set(model.state_dict())
        defense = DEFENSES.get("ibau")(rounds=6, batch_size=8, lr=1e-2, hypergradient=hypergradient,
                                       bn_stats="batch")
        out = defense.purify(model, x, y, seed=3)
        assert not any(m.training for m in out.modules())
        assert set(out.state_dict()) == keys
        assert out[1].momentum == 0.1 and not hasattr(out[1], "_purify_momentum")
        assert defense.tunable_parameters == sum(p.numel() for p in model.parameters())
        assert defense.perturbation.shape == x.shape[1:]
        states.append(out.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    start, _, _ = tiny_rf_like()
    assert not torch.equal(start.state_dict()["0.weight"], states[0]["0.weight"])  # it did train


@pytest.mark.parametrize("bn_stats, moves", [("frozen", False), ("batch", False), ("update", True)])
def test_bn_running_stats_follow_bn_stats(bn_stats, moves):
    model, x, y = tiny_rf_like()
    model.train()
    with torch.no_grad():
        model(x * 2 + 1)  # non-default running statistics, as a trained model has
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    DEFENSES.get("ibau")(rounds=3, batch_size=8, bn_stats=bn_stats).purify(model.eval(), x, y, seed=0)
    changed = any(not torch.equal(model.state_dict()[k], v) for k, v in buffers.items())
    assert changed == moves


@pytest.mark.parametrize("key, value", [("eps", 0), ("rounds", 0), ("rounds", 2.5), ("neumann_steps", 0),
                                        ("neumann_alpha", -1.0), ("inner_lr", 0), ("clean_weight", -1.0),
                                        ("inner_reg", -0.1), ("hypergradient", "yes"), ("warm_start", 1),
                                        ("bn_stats", "sometimes")])
def test_bad_settings_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        DEFENSES.get("ibau")(**{key: value})
    with pytest.raises(ConfigError, match="epsilon"):
        DEFENSES.get("ibau")(epsilon=0.1)


def test_ibau_removes_the_rf_burst_backdoor(backdoored_rf):
    """The burst is a universal additive pattern of norm 0.5 × a frame's on this config, so eps 0.5;
    clean_weight 10 keeps most of the clean accuracy (1.0 costs ~0.1–0.2 here, see ibau.py)."""
    config, data, model_path = backdoored_rf
    for hypergradient in (True, False):
        model, _ = stages.load_model(config, model_path, torch.device("cpu"))
        before = attack_metrics(model, data)
        start = time.perf_counter()
        defense = DEFENSES.get("ibau")(rounds=100, eps=0.5, clean_weight=10.0, hypergradient=hypergradient)
        purified = defense.purify(model, data["x_val"], data["y_val"], seed=0)
        seconds = time.perf_counter() - start
        after = attack_metrics(purified, data)
        print(f"\nibau hypergradient={hypergradient}: ACC {before['acc']:.3f} -> {after['acc']:.3f}, "
              f"ASR {before['asr']:.3f} -> {after['asr']:.3f}, {seconds:.1f} s")
        assert before["asr"] > 0.9
        assert after["asr"] < 0.3
        assert after["acc"] > before["acc"] - 0.12
