"""ft and fip on a tiny model: they run, report their tunable parameters, move the weights, honour
bn_stats, reject bad hyper-parameters by name, and are deterministic on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.trainer import TrainingDiverged
from pipeline_pkg.defenses.base import Defense
from pipeline_pkg.registry import DEFENSES
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


def make(name: str, **params) -> Defense:
    defaults = {"ft": {"steps": 5, "batch_size": 8},
                "fip": {"steps": 5, "fisher_every": 2, "batch_size": 8}}.get(name, {"batch_size": 8})
    return DEFENSES.get(name)(**{**defaults, **params})


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", ["ft", "fip"])
def test_purify_runs_and_changes_weights(name, backdoored, clean):
    model = copy.deepcopy(backdoored)
    before = parameters(model)
    defense = make(name)
    logged = []
    out = defense.purify(model, *clean, seed=0, log=lambda m, s: logged.append((s, m)))
    assert isinstance(out, torch.nn.Module)
    assert not out.training and not any(m.training for m in out.modules())
    assert defense.tunable_parameters == sum(p.numel() for p in backdoored.parameters())
    after = parameters(out)
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "weights must change"
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(p.requires_grad for p in out.parameters())
    assert logged and logged[0][0] == 0 and "loss" in logged[0][1]


@pytest.mark.parametrize("name", ["ft", "fip"])
def test_bn_stats_frozen_vs_update(name, backdoored, clean):
    stats = bn_buffers(backdoored)
    assert stats

    frozen = make(name, bn_stats="frozen").purify(copy.deepcopy(backdoored), *clean, seed=0)
    for k, v in bn_buffers(frozen).items():
        assert torch.equal(v, stats[k]), f"{k} changed with bn_stats=frozen"

    updated = make(name, bn_stats="update").purify(copy.deepcopy(backdoored), *clean, seed=0)
    after = bn_buffers(updated)
    assert any(not torch.equal(after[k], stats[k]) for k in stats if k.endswith("running_mean"))
    assert all(int(after[k]) == int(stats[k]) + 5 for k in stats if k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("name", ["ft", "fip"])
def test_bn_stats_batch_trains_on_batch_statistics_but_keeps_running_ones(name, backdoored, clean):
    stats = bn_buffers(backdoored)
    momenta = [m.momentum for m in backdoored.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    frozen = make(name, bn_stats="frozen").purify(copy.deepcopy(backdoored), *clean, seed=0)
    batch = make(name, bn_stats="batch").purify(copy.deepcopy(backdoored), *clean, seed=0)
    after = bn_buffers(batch)
    for k in stats:
        if k.endswith(("running_mean", "running_var")):
            assert torch.equal(after[k], stats[k]), f"{k} changed with bn_stats=batch"
    # Normalising with batch statistics gives other gradients than the frozen running statistics.
    assert any(not torch.equal(a, b) for a, b in zip(frozen.parameters(), batch.parameters()))
    assert [m.momentum for m in batch.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] == momenta
    assert not batch.training


@pytest.mark.parametrize("name", ["ft", "fip"])
def test_purify_is_deterministic(name, backdoored, clean):
    a = make(name).purify(copy.deepcopy(backdoored), *clean, seed=3)
    b = make(name).purify(copy.deepcopy(backdoored), *clean, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = make(name).purify(copy.deepcopy(backdoored), *clean, seed=4)
    assert any(not torch.equal(sa[k], v) for k, v in c.state_dict().items())


def test_fip_without_trace_or_retention_is_plain_sgd_finetuning(backdoored, clean):
    # eta_f = eta_r = 0 leaves cross-entropy only; it still runs and moves the weights.
    model = copy.deepcopy(backdoored)
    before = parameters(model)
    make("fip", eta_f=0.0, eta_r=0.0).purify(model, *clean, seed=0)
    assert any(not torch.equal(before[k], v) for k, v in parameters(model).items())


def trained_signal_classifier() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small BatchNorm CNN trained to 100% on 4 classes of noisy sinusoids (class = frequency), and its
    data: a trained model's Fisher is what FIP's η_F must be weighed against, not a random one's."""
    gen = torch.Generator().manual_seed(0)
    n, length, classes = 600, 64, 4
    y = torch.randint(0, classes, (n,), generator=gen)
    t = torch.arange(length, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=gen) * 2 * torch.pi
    signal = torch.sin(2 * torch.pi * (y[:, None] + 1) * t / length + phase)
    x = torch.stack([signal, torch.zeros_like(signal)], 1) + 0.5 * torch.randn(n, 2, length, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 8, 5, padding=2), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool1d(8), torch.nn.Flatten(), torch.nn.Linear(64, 32),
                                torch.nn.ReLU(), torch.nn.Linear(32, classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, 64):
            idx = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).float().mean()) > 0.95
    return model, x, y


def test_fip_weighs_its_trace_against_ce_and_reports_the_ratio():
    """With the default η_F, η_F·‖∇Tr(F)‖ stays within two orders of magnitude of ‖∇CE‖ on a trained
    model and the clip never fires; the paper's η_F 0.5 swamps CE (ratio > 100) and trips the clip. The
    ratio and the clip rate are what the purify report shows."""
    model, x, y = trained_signal_classifier()
    fip = make("fip", steps=40, fisher_every=2, batch_size=128)
    fip.purify(copy.deepcopy(model), x[:40], y[:40], seed=0)
    assert fip.diagnostics["trace_steps"] == 20
    assert 1e-2 <= fip.diagnostics["trace_grad_ratio"] <= 1e2
    assert fip.diagnostics["clip_rate"] == 0.0
    paper = make("fip", steps=40, fisher_every=2, batch_size=128, eta_f=0.5)
    paper.purify(copy.deepcopy(model), x[:40], y[:40], seed=0)
    assert paper.diagnostics["trace_grad_ratio"] > 1e2
    assert paper.diagnostics["clip_rate"] > 0


def test_fip_step_follows_the_summed_gradient_of_ce_trace_and_retention(backdoored, clean):
    """FIP takes CE's and the trace's gradients separately (to measure their ratio) and adds the
    retention term's in closed form; the step must equal plain SGD on the summed loss."""
    from pipeline_pkg.defenses import fisher
    from pipeline_pkg.runtime import InfiniteBatches

    common = dict(steps=2, fisher_every=1, eta_f=0.3, eta_r=50.0, max_grad_norm=1e9, lr=0.05, momentum=0.0)
    got = make("fip", **common).purify(copy.deepcopy(backdoored), *clean, seed=0)

    model = copy.deepcopy(backdoored)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    anchors = [p.detach().clone() for p in params]
    diag = fisher.diagonal_fisher(model, clean[0], params, gen)
    batches = InfiniteBatches(*clean, 8, 0)
    model.eval()  # bn_stats "frozen"
    for _ in range(2):
        xb, yb = next(batches)
        logits = model(xb)
        loss = (torch.nn.functional.cross_entropy(logits, yb)
                + 0.3 * fisher.fisher_trace_estimate(logits, params, gen, 1)
                + 50.0 * fisher.retention_penalty(params, anchors, diag))
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.05 * g
    for k, v in parameters(model).items():
        torch.testing.assert_close(parameters(got)[k], v, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(v, parameters(backdoored)[k]) for k, v in parameters(model).items())


def test_fip_cosine_schedule_halves_the_second_of_two_steps(backdoored, clean, monkeypatch):
    """lr_schedule cosine over 2 steps: the first at lr, the second at lr·(1 + cos(π/2))/2 = lr/2;
    constant keeps lr."""
    from pipeline_pkg.defenses import fip

    rates = []
    step = fip.guarded_step

    def recording(optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(fip, "guarded_step", recording)
    make("fip", steps=2, lr=0.02, lr_schedule="cosine").purify(copy.deepcopy(backdoored), *clean, seed=0)
    assert rates == pytest.approx([0.02, 0.01], rel=1e-12)
    rates.clear()
    make("fip", steps=2, lr=0.02).purify(copy.deepcopy(backdoored), *clean, seed=0)
    assert rates == pytest.approx([0.02, 0.02], rel=1e-12)


@pytest.mark.parametrize("name, params, key", [
    ("fip", {"lr_schedule": "linear"}, "lr_schedule"),
    ("ft", {"lr": -1}, "lr"),
    ("ft", {"steps": 0}, "steps"),
    ("ft", {"momentum": -0.1}, "momentum"),
    ("fip", {"momentum": 1.5}, "momentum"),
    ("fip", {"bn_stats": "x"}, "bn_stats"),
    ("fip", {"eta_f": -1}, "eta_f"),
    ("fip", {"probes": 0}, "probes"),
    ("fip", {"fisher_every": 0}, "fisher_every"),
    ("ft", {"bn_stats": "train"}, "bn_stats"),
    ("ft", {"max_grad_norm": 0}, "max_grad_norm"),
    ("nad", {"max_grad_norm": -1}, "max_grad_norm"),
    ("ftsam", {"max_grad_norm": 0}, "max_grad_norm"),
])
def test_bad_hyper_parameters(name, params, key):
    with pytest.raises(ConfigError, match=rf"parameter {key}="):
        DEFENSES.get(name)(**params)


@pytest.mark.parametrize("name", ["ft", "nad", "ftsam"])
def test_max_grad_norm_bounds_each_step(name, backdoored, clean):
    # Plain SGD steps at this learning rate throw the weights out (as on an Adam-trained PointNet);
    # clipped, each step moves the weights by at most lr · max_grad_norm (plus momentum's carry).
    steps = {"steps": 3, "teacher_steps": 1} if name == "nad" else {"steps": 3}
    with pytest.raises(TrainingDiverged):
        make(name, lr=1e6, momentum=0.0, weight_decay=0.0, **steps).purify(copy.deepcopy(backdoored), *clean,
                                                                           seed=0)
    model = copy.deepcopy(backdoored)
    before = parameters(model)
    make(name, lr=1e6, momentum=0.0, weight_decay=0.0, max_grad_norm=1e-6, **steps).purify(model, *clean, seed=0)
    moved = torch.sqrt(sum(((v - before[k]) ** 2).sum() for k, v in parameters(model).items()))
    assert 0 < moved <= 3 * 1e6 * 1e-6 * (1 + 1e-4)


def test_unknown_hyper_parameter_named():
    with pytest.raises(ConfigError) as info:
        DEFENSES.get("fip")(foo=1)
    message = str(info.value)
    assert "foo" in message and "eta_f" in message and "bn_stats" in message


def test_none_defense_returns_model_unchanged(backdoored, clean):
    model = copy.deepcopy(backdoored)
    before = model.state_dict()
    out = DEFENSES.get("none")().purify(model, *clean, seed=0)
    assert out is model
    for k, v in out.state_dict().items():
        assert torch.equal(v, before[k])
