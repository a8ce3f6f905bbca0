"""ngf: only the chosen Linear layer moves; the K-FAC direction equals the brute-force damped Kronecker
solve; KL clipping bounds the step in the damped-Fisher metric; deterministic; bad settings rejected by
name; and what it does to a real RF backdoor."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pipeline_pkg.defenses.ngf as ngf
from pipeline_pkg import stages
from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.defenses.fisher import diagonal_fisher, sampled_log_likelihood
from pipeline_pkg.evaluator import attack_metrics
from pipeline_pkg.runtime import InfiniteBatches
from tiny import clean_budget, tiny_rf_cnn

torch.set_num_threads(1)

L = 64
C = 3


@pytest.fixture(scope="module")
def backdoored():
    return tiny_rf_cnn(L, C)


@pytest.fixture(scope="module")
def clean():
    return clean_budget(L, C)


def make(**params) -> ngf.NaturalGradientFineTuning:
    return ngf.NaturalGradientFineTuning(**{"steps": 5, "batch_size": 8, "inverse_every": 2, **params})


def changed_keys(before: nn.Module, after: nn.Module) -> set[str]:
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-major vec, the convention under which vec(g aᵀ) = a ⊗ g and the Fisher block is A ⊗ G."""
    return m.mT.reshape(-1)


def test_registered():
    from pipeline_pkg.registry import DEFENSES

    assert DEFENSES.get("ngf") is ngf.NaturalGradientFineTuning


def test_only_the_classifier_changes(backdoored, clean):
    model = copy.deepcopy(backdoored)
    defense = make(log_every=1)
    logged, trainable = [], []

    def log(metrics, step):
        logged.append((step, metrics))
        trainable.append({k for k, p in model.named_parameters() if p.requires_grad})

    out = defense.purify(model, *clean, seed=0, log=log)
    # Frozen while it runs (the released code forgets this), so no other gradient is even computed.
    assert trainable == [{"classifier.weight", "classifier.bias"}] * 5
    assert all(p.grad is None for k, p in out.named_parameters() if not k.startswith("classifier."))
    # Every other tensor — conv weights, the hidden Linear, BN weights and running statistics — is
    # bit-identical; both classifier tensors moved.
    assert changed_keys(backdoored, out) == {"classifier.weight", "classifier.bias"}
    assert defense.tunable_parameters == C * 8 + C
    assert not any(m.training for m in out.modules())
    assert all(p.requires_grad for p in out.parameters()), "requires_grad flags restored"
    assert all(torch.isfinite(p).all() for p in out.parameters())
    assert logged and logged[0][0] == 0 and {"loss", "ce", "kl_scale"} <= set(logged[0][1])


def test_layer_names_another_linear(backdoored, clean):
    # features.7 is the hidden Linear, followed by an in-place ReLU.
    defense = make(layer="features.7")
    out = defense.purify(copy.deepcopy(backdoored), *clean, seed=0)
    assert changed_keys(backdoored, out) == {"features.7.weight", "features.7.bias"}
    assert defense.tunable_parameters == 16 * 8 + 8


def test_in_place_activation_does_not_corrupt_the_g_factor(backdoored, clean):
    # G must hold gradients w.r.t. the pre-activation output of features.7, although ReLU(inplace=True)
    # overwrites that output; brute force: the output recomputed from the captured input.
    model = copy.deepcopy(backdoored)
    defense = make(layer="features.7", steps=1, factor_decay=0.0)
    defense.purify(model, *clean, seed=0)
    # Re-run the same first batch and sample with an unmodified model and autograd only.
    ref = copy.deepcopy(backdoored)
    gen = torch.Generator().manual_seed(0)
    ref_layer = ref.features[7]
    diagonal_fisher(ref, clean[0], [ref_layer.weight, ref_layer.bias], gen)  # same generator draws
    xb, _ = next(InfiniteBatches(*clean, 8, 0))
    a = ref.features[:7](xb).detach()
    s = ref_layer(a)
    logits = ref.classifier(torch.relu(s))
    g = torch.autograd.grad(sampled_log_likelihood(logits, gen).sum(), s)[0]
    assert torch.allclose(defense.factors.G, (g.T @ g / len(g)).double(), rtol=1e-5, atol=1e-9)
    a1 = torch.cat([a, torch.ones(len(a), 1)], 1).double()
    assert torch.allclose(defense.factors.A, a1.T @ a1 / len(a1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("layer, pattern", [
    ("nope", "layer='nope'"), ("features.99", "layer='features.99'"),
    ("features.0", "Sequential"), ("features.5", "AdaptiveAvgPool1d"),
])
def test_unknown_or_non_linear_layer_rejected_by_name(backdoored, clean, layer, pattern):
    model = copy.deepcopy(backdoored)
    with pytest.raises(ConfigError, match=pattern) as info:
        make(layer=layer).purify(model, *clean, seed=0)
    assert "layer" in str(info.value)
    assert changed_keys(backdoored, model) == set()


def test_factors_are_the_exact_fisher_for_one_sample():
    # For a single sample, E[(a⊗g)(a⊗g)ᵀ] = (a aᵀ) ⊗ (g gᵀ) exactly: the factors, in their ordering
    # convention, must reproduce the outer product of the true per-sample gradient of [W, b].
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(1, 4)
    logits = layer(x)
    factors = ngf.KroneckerFactors(layer, decay=0.95)
    gen = torch.Generator().manual_seed(0)
    g = ngf.sampled_output_grads(logits, logits, gen)
    factors.update(x, g)
    gen = torch.Generator().manual_seed(0)
    log_lik = sampled_log_likelihood(logits, gen).sum()
    gw, gb = torch.autograd.grad(log_lik, [layer.weight, layer.bias])
    u = vec(torch.cat([gw, gb[:, None]], 1)).double()
    assert torch.allclose(torch.kron(factors.A, factors.G), torch.outer(u, u), atol=1e-10)


def test_factors_are_running_averages():
    layer = nn.Linear(3, 2)
    factors = ngf.KroneckerFactors(layer, decay=0.9)
    gen = torch.Generator().manual_seed(0)
    a1, g1, a2, g2 = (torch.randn(5, n, generator=gen) for n in (3, 2, 3, 2))
    factors.update(a1, g1)
    factors.update(a2, g2)

    def aa(a):
        a = torch.cat([a, torch.ones(len(a), 1)], 1).double()
        return a.T @ a / len(a)

    def gg(g):
        g = g.double()
        return g.T @ g / len(g)

    assert torch.allclose(factors.A, 0.9 * aa(a1) + 0.1 * aa(a2))
    assert torch.allclose(factors.G, 0.9 * gg(g1) + 0.1 * gg(g2))


def test_g_factor_estimates_the_true_fisher_not_the_empirical_one():
    # Labels are drawn from the model: for the classifier, E_ŷ[g gᵀ] = diag(p) − p pᵀ per sample.
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(20, 4).repeat(200, 1)
    logits = layer(x) * 2
    factors = ngf.KroneckerFactors(layer, decay=0.5)
    factors.update(x, ngf.sampled_output_grads(logits, logits, torch.Generator().manual_seed(0)))
    p = torch.softmax(logits.detach(), 1).double()
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert torch.allclose(factors.G, expected, atol=0.02)
    y = torch.zeros(len(x), dtype=torch.long)  # an empirical Fisher with fixed labels differs clearly
    e = F.one_hot(y, 3).double() - p
    assert (e.T @ e / len(e) - expected).abs().max() > 0.1


@pytest.mark.parametrize("bias", [True, False])
def test_preconditioning_matches_brute_force_kronecker_solve(bias):
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(5, 3, bias=bias)
    factors = ngf.KroneckerFactors(layer, decay=0.8)
    for _ in range(3):
        factors.update(torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen))
    factors.refresh()
    grad = torch.randn(3, 5 + bias, generator=gen, dtype=torch.float64)
    for damping in (1e-3, 0.5):
        direction = factors.precondition(grad, damping)
        kron = torch.kron(factors.A, factors.G)
        brute = torch.linalg.solve(kron + damping * torch.eye(len(kron), dtype=torch.float64), vec(grad))
        assert torch.allclose(vec(direction), brute, rtol=1e-8, atol=1e-10)
    # Undamped it is G⁻¹ ∇ A⁻¹ (both factors are full rank here).
    undamped = factors.precondition(grad, 1e-12)
    assert torch.allclose(undamped, torch.linalg.solve(factors.G, grad) @ torch.linalg.inv(factors.A),
                          rtol=1e-6, atol=1e-8)


def test_eigendecomposition_is_only_recomputed_every_inverse_every_steps():
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(3, 2)
    factors = ngf.KroneckerFactors(layer, decay=0.5)
    factors.update(torch.randn(6, 3, generator=gen), torch.randn(6, 2, generator=gen))
    factors.refresh()
    grad = torch.randn(2, 4, generator=gen)
    before = factors.precondition(grad, 1e-3)
    factors.update(5 * torch.randn(6, 3, generator=gen), torch.randn(6, 2, generator=gen))
    assert torch.equal(factors.precondition(grad, 1e-3), before), "stale eigenbasis until refresh"
    factors.refresh()
    assert not torch.allclose(factors.precondition(grad, 1e-3), before)


def one_step(backdoored, clean, kl_clip):
    model = copy.deepcopy(backdoored)
    defense = make(steps=1, momentum=0.0, eta_r=0.0, kl_clip=kl_clip, lr=0.5)
    w0 = torch.cat([model.classifier.weight, model.classifier.bias[:, None]], 1).detach().clone()
    defense.purify(model, *clean, seed=0)
    w1 = torch.cat([model.classifier.weight, model.classifier.bias[:, None]], 1).detach()
    return (w1 - w0).double(), defense.factors


def test_kl_clipping_bounds_the_step(backdoored, clean):
    free, factors = one_step(backdoored, clean, kl_clip=1e9)
    tiny = 1e-8
    clipped, _ = one_step(backdoored, clean, kl_clip=tiny)

    def fisher_norm2(delta):  # Δᵀ (A ⊗ G + λI) Δ, the step's length in the damped-Fisher metric
        kron = torch.kron(factors.A, factors.G)
        damping = float(make().damping)
        return float(vec(delta) @ (kron + damping * torch.eye(len(kron), dtype=torch.float64)) @ vec(delta))

    assert fisher_norm2(free) > 100 * tiny, "the unclipped step would exceed the bound"
    # The clipped step sits on the bound, in the same direction, shorter by √(kl_clip / free length).
    assert fisher_norm2(clipped) == pytest.approx(tiny, rel=1e-3)
    scale = (tiny / fisher_norm2(free)) ** 0.5
    assert torch.allclose(clipped, scale * free, rtol=1e-3, atol=1e-12)
    assert clipped.norm() < 0.1 * free.norm()


def test_purify_is_deterministic(backdoored, clean):
    a = make().purify(copy.deepcopy(backdoored), *clean, seed=3)
    b = make().purify(copy.deepcopy(backdoored), *clean, seed=3)
    assert changed_keys(a, b) == set()
    c = make().purify(copy.deepcopy(backdoored), *clean, seed=4)
    assert changed_keys(a, c)


@pytest.mark.parametrize("params, key", [
    ({"lr": -1}, "lr"), ({"steps": 0}, "steps"), ({"momentum": 1.0}, "momentum"),
    ({"momentum": -0.1}, "momentum"), ({"damping": 0}, "damping"), ({"kl_clip": -1e-3}, "kl_clip"),
    ({"factor_decay": 1.0}, "factor_decay"), ({"factor_decay": -0.5}, "factor_decay"),
    ({"inverse_every": 0}, "inverse_every"), ({"eta_r": -1}, "eta_r"), ({"batch_size": 0}, "batch_size"),
    ({"layer": ""}, "layer"), ({"layer": 3}, "layer"), ({"bn_stats": "x"}, "bn_stats"),
])
def test_bad_hyper_parameters(params, key):
    with pytest.raises(ConfigError, match=rf"parameter {key}="):
        ngf.NaturalGradientFineTuning(**params)


def test_unknown_hyper_parameter_named():
    with pytest.raises(ConfigError) as info:
        ngf.NaturalGradientFineTuning(foo=1)
    assert "foo" in str(info.value) and "kl_clip" in str(info.value)


def test_ngf_on_backdoored_rf(backdoored_rf):
    config, data, model_path = backdoored_rf
    model, _ = stages.load_model(config, model_path, torch.device("cpu"))
    original = copy.deepcopy(model)
    before = attack_metrics(model, data)
    defense = ngf.NaturalGradientFineTuning(steps=100)
    start = time.perf_counter()
    purified = defense.purify(model, data["x_val"], data["y_val"], seed=0)
    seconds = time.perf_counter() - start
    after = attack_metrics(purified, data)
    with torch.no_grad():
        moved = float((purified.classifier.weight - original.classifier.weight).norm()
                      / original.classifier.weight.norm())
    print(f"\nngf on backdoored_rf ({len(data['x_val'])} clean samples, 100 steps, {seconds:.2f} s): "
          f"ACC {before['acc']:.3f} -> {after['acc']:.3f}, ASR {before['asr']:.3f} -> {after['asr']:.3f}, "
          f"RA {before['ra']:.3f} -> {after['ra']:.3f}, relative classifier change {moved:.4f}")
    assert changed_keys(original, purified) == {"classifier.weight", "classifier.bias"}
    assert moved > 1e-3
    assert after["acc"] > 0.125 * 2  # well above chance (8 classes)
