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


def test_fip_per_parameter_trace_is_the_trace_divided_by_the_tuned_values(backdoored, clean):
    """trace_per_parameter with η_F equals the summed trace with η_F / (tuned values), step for step."""
    n = sum(p.numel() for p in backdoored.parameters())
    common = dict(steps=3, fisher_every=1, eta_r=0.0, max_grad_norm=1e9, lr=0.01)
    per_parameter = make("fip", eta_f=2.0, trace_per_parameter=True, **common).purify(
        copy.deepcopy(backdoored), *clean, seed=0)
    summed = make("fip", eta_f=2.0 / n, **common).purify(copy.deepcopy(backdoored), *clean, seed=0)
    plain = make("fip", eta_f=2.0, **common).purify(copy.deepcopy(backdoored), *clean, seed=0)
    for k, v in parameters(per_parameter).items():
        torch.testing.assert_close(v, parameters(summed)[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(v, parameters(plain)[k]) for k, v in parameters(per_parameter).items())


def test_fip_cosine_schedule_halves_the_second_of_two_steps(backdoored, clean):
    """lr_schedule cosine over 2 steps: the first at lr, the second at lr·(1 + cos(π/2))/2 = lr/2. Every
    batch is the whole clean set and BN is frozen, so each step's gradient depends on the weights alone."""
    # In float64, so that the clean set's order within a batch changes no bit that the tolerance sees.
    model, x, y = copy.deepcopy(backdoored).double(), clean[0].double(), clean[1]
    common = dict(eta_f=0.0, eta_r=0.0, momentum=0.0, max_grad_norm=1e9, batch_size=len(x))
    cosine = make("fip", steps=2, lr=0.02, lr_schedule="cosine", **common).purify(copy.deepcopy(model), x, y, seed=0)
    first = make("fip", steps=1, lr=0.02, **common).purify(copy.deepcopy(model), x, y, seed=0)
    by_hand = make("fip", steps=1, lr=0.01, **common).purify(first, x, y, seed=0)
    constant = make("fip", steps=2, lr=0.02, **common).purify(copy.deepcopy(model), x, y, seed=0)
    for k, v in parameters(cosine).items():
        torch.testing.assert_close(v, parameters(by_hand)[k], rtol=1e-12, atol=1e-12)
    assert max(float((v - parameters(constant)[k]).abs().max()) for k, v in parameters(cosine).items()) > 1e-4


@pytest.mark.parametrize("name, params, key", [
    ("fip", {"trace_per_parameter": "yes"}, "trace_per_parameter"),
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
